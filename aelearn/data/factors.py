"""Datasets with ground-truth factors of variation: a finite grid of discrete factors, rendered on demand.

A :class:`FactorDataset` enumerates every combination of its factors exactly once, in row-major order
(the last factor varies fastest, as in dSprites' ``latents_bases``). Factors are int64 indices into
each factor's list of values; images are float32 ``[n, C, H, W]`` in [0, 1]. Every method works on
whole batches: disentanglement metrics draw thousands of factor vectors at a time, and a DataLoader
fetches a batch through :meth:`FactorDataset.__getitems__` in one rendering call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


def check_count(n, name: str = "n") -> int:
    """``n`` as an int ≥ 0, or a ValueError/TypeError naming ``name``."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be ≥ 0, got {n}")
    return n


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_integer_tensor(value, name: str, ndim: int) -> None:
    """A TypeError/ValueError naming ``name`` unless ``value`` is an ``ndim``-D integer tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def item_index(indices: Sequence[int], length: int) -> torch.Tensor:
    """Item indices from a DataLoader or ``ds[i]`` as int64 ``[n]``, checked against ``[0, length)``.

    Out of range is an IndexError, not a ValueError: the sequence protocol (iteration over a
    dataset, samplers) expects one.
    """
    index = torch.as_tensor(indices).reshape(-1)
    if index.numel() == 0:
        index = index.long()
    check_integer_tensor(index, "index", ndim=1)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= length):
        raise IndexError(f"index must lie in [0, {length}), got values from {int(index.min())} to {int(index.max())}")
    return index.long()


class FactorDataset(Dataset):
    """Base of datasets whose images are a deterministic function of discrete ground-truth factors.

    Subclasses set ``factor_names``, ``factor_sizes``, ``observation_shape`` (C, H, W) and implement
    :meth:`images_from_factors`; they may override :meth:`sample_factors` to draw factors from a
    distribution other than the uniform one over the grid.

    As a map-style dataset: ``len(ds) = prod(factor_sizes)``, ``ds[i] -> (image [C, H, W],
    factors [F])`` with ``factors = index_to_factors(i)``.
    """

    factor_names: tuple[str, ...]
    factor_sizes: tuple[int, ...]
    observation_shape: tuple[int, int, int]

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    @property
    def factor_strides(self) -> tuple[int, ...]:
        """Index step of each factor in the row-major grid: ``index = Σ_j factors[:, j] · stride_j``."""
        return tuple(math.prod(self.factor_sizes[j + 1 :]) for j in range(self.num_factors))

    def __len__(self) -> int:
        return math.prod(self.factor_sizes)

    def images_from_factors(self, factors: torch.Tensor) -> torch.Tensor:
        """Render ``factors: [n, F]`` int64 to images ``[n, C, H, W]`` float32 in [0, 1] (same device)."""
        raise NotImplementedError

    def check_factors(self, factors: torch.Tensor, name: str = "factors") -> None:
        """A TypeError/ValueError naming ``name`` unless ``factors`` is an integer ``[n, F]`` tensor on the grid."""
        check_integer_tensor(factors, name, ndim=2)
        if factors.shape[1] != self.num_factors:
            raise ValueError(
                f"{name} must have shape [n, {self.num_factors}] (factors {', '.join(self.factor_names)}), "
                f"got {tuple(factors.shape)}"
            )
        if factors.shape[0] == 0:
            return
        sizes = torch.tensor(self.factor_sizes, device=factors.device)
        low, high = factors.amin(0), factors.amax(0)
        bad = ((low < 0) | (high >= sizes)).nonzero()
        if len(bad):
            j = int(bad[0, 0])
            raise ValueError(
                f"{name}[:, {j}] ({self.factor_names[j]}) must lie in [0, {self.factor_sizes[j]}), "
                f"got values from {int(low[j])} to {int(high[j])}"
            )

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` factor vectors ``[n, F]`` int64 drawn uniformly and independently from the grid (CPU)."""
        check_count(n)
        check_generator(generator)
        columns = [torch.randint(size, (n,), generator=generator) for size in self.factor_sizes]
        return torch.stack(columns, dim=1) if columns else torch.zeros(n, 0, dtype=torch.int64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [n, C, H, W], factors [n, F])`` for ``n`` factor vectors from :meth:`sample_factors`."""
        factors = self.sample_factors(n, generator)
        return self.images_from_factors(factors), factors

    def index_to_factors(self, index: torch.Tensor) -> torch.Tensor:
        """Grid indices ``index: [n]`` (integer, in [0, len)) to factors ``[n, F]`` int64."""
        check_integer_tensor(index, "index", ndim=1)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise ValueError(
                f"index must lie in [0, {len(self)}), got values from {int(index.min())} to {int(index.max())}"
            )
        index = index.long()
        strides = torch.tensor(self.factor_strides, device=index.device)
        sizes = torch.tensor(self.factor_sizes, device=index.device)
        return torch.div(index[:, None], strides, rounding_mode="floor") % sizes

    def factors_to_index(self, factors: torch.Tensor) -> torch.Tensor:
        """Factors ``[n, F]`` (integer, on the grid) to grid indices ``[n]`` int64."""
        self.check_factors(factors)
        strides = torch.tensor(self.factor_strides, device=factors.device)
        return (factors.long() * strides).sum(1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, factors = self._fetch(item_index([index], len(self)))
        return images[0], factors[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch ``indices`` rendered in one call, as the list of ``(image, factors)`` pairs that
        a DataLoader's ``collate_fn`` expects."""
        images, factors = self._fetch(item_index(indices, len(self)))
        return list(zip(images.unbind(0), factors.unbind(0)))

    def _fetch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factors = self.index_to_factors(index)
        return self.images_from_factors(factors), factors
