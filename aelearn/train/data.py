"""Batches for training: a resumable, replica-aware order of examples, and partial labelling.

:class:`GlobalBatchSampler` is the trainer's distributed sampler. Epoch e visits the examples in a
permutation seeded by (seed, e), cut into global batches of ``batch_size``; replica r of W takes
examples r, r + W, ... of each global batch. The replicas together see exactly the global batches
one process would, which is what makes W processes train like one on the same global batch, and
the position in the data is a function of the step alone (step // batches per epoch is the epoch),
which is what makes a resumed run read the same batches as an uninterrupted one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from aelearn.train.rng import derive_seed


class GlobalBatchSampler(Sampler[list[int]]):
    """Endless batches of dataset indices for one replica, from the batch of global step ``start``.

    ``size``: the dataset's length; ``batch_size``: the global batch, a multiple of ``world_size``;
    the last incomplete global batch of each epoch is dropped.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes ({world_size})")
        if size < batch_size:
            raise ValueError(f"the dataset has {size} examples, fewer than one batch of batch_size={batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.batches_per_epoch = size // batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "data-order", epoch))
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        for epoch in itertools.count(epoch):
            order = self.epoch_order(epoch)
            for index in range(offset, self.batches_per_epoch):
                batch = order[index * self.batch_size : (index + 1) * self.batch_size]
                yield batch[self.rank :: self.world_size].tolist()
            offset = 0


class PartiallyLabelled(Dataset):
    """``dataset`` with the labels of all but ``labelled`` examples (chosen by ``seed``) set to -1.

    Items are ``(image, label)`` with an int label ``[]`` or factors ``[F]`` (all set to -1).
    Semi-supervised models (M2 of Kingma et al. 2014) then find both kinds in every batch.
    """

    def __init__(self, dataset: Dataset, labelled: int, *, seed: int):
        if not 0 <= labelled <= len(dataset):
            raise ValueError(f"labelled must be between 0 and the dataset's {len(dataset)} examples, got {labelled}")
        self.dataset = dataset
        generator = torch.Generator().manual_seed(derive_seed(seed, "labelled"))
        self.is_labelled = torch.zeros(len(dataset), dtype=torch.bool)
        self.is_labelled[torch.randperm(len(dataset), generator=generator)[:labelled]] = True

    def __len__(self) -> int:
        return len(self.dataset)

    def _masked(self, index: int, item):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError("labelled_examples needs a dataset whose items are (image, label)")
        image, label, *rest = item
        if not self.is_labelled[index]:
            label = torch.full_like(torch.as_tensor(label), -1)
        return (image, label, *rest)

    def __getitem__(self, index: int):
        return self._masked(index, self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list:
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [self._masked(i, item) for i, item in zip(indices, items)]


def make_loader(dataset: Dataset, sampler: GlobalBatchSampler, *, num_workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """The loader of the sampler's batches. Workers are seeded from ``seed`` and the rank, not from
    the global torch generator, so that starting them leaves the training stream untouched."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "loader-workers", sampler.rank))
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
    )
