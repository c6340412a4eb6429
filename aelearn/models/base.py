"""The model protocol the trainer drives, and the batch conventions every model shares.

A model is an ``nn.Module`` with ``loss(batch, *, step) -> dict[str, Tensor]``: 0-dim tensors,
``"loss"`` the total the main optimiser minimises, every other key logged (the same keys at every
step; values made from Python numbers, such as scheduled weights, best stay on the CPU, where
creating them does not synchronise a GPU). Families that train
several sets of parameters against each other (the discriminators of FactorVAE, AAE, WAE-GAN,
FaderNetworks and PixelGAN-AE) declare them with :meth:`Model.optimizer_groups`; the group
``"main"`` minimises ``"loss"`` and every other group ``g`` minimises ``"loss/g"``. The trainer
computes all the losses in one forward pass, back-propagates each group's loss into that group's
parameters only, then steps the groups' optimisers in the order declared. A discriminator's loss
therefore takes detached codes, and the main loss may go through the discriminator without
training it.

Batches are what the data loader collates: an image tensor ``[N, C, H, W]``, or a sequence
``(images, labels_or_factors, ...)``. Labels ``-1`` mark unlabelled examples (semi-supervised
batches mix both).
"""

from __future__ import annotations

import torch
from torch import nn

MAIN_GROUP = "main"


def loss_key(group: str) -> str:
    """The key of a group's loss in the dict ``loss()`` returns: "loss" for "main", else "loss/<group>"."""
    return "loss" if group == MAIN_GROUP else f"loss/{group}"


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images [N, C, H, W], labels [N] or [N, F] or None)`` of a collated batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"a batch must be an image tensor or a sequence (images, labels, ...), got {type(batch).__name__}")


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class Model(nn.Module):
    """Base of the models the trainer drives (any module with the same methods will do)."""

    def loss(self, batch, *, step: int) -> dict[str, torch.Tensor]:
        """The named 0-dim loss terms of one batch at training step ``step`` (for scheduled weights)."""
        raise NotImplementedError

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint lists of parameters, one optimiser each, stepped in this order. One group by default."""
        return {MAIN_GROUP: trainable_parameters(self)}


class GenerativeModel(Model):
    """A model with an encoder and a decoder: what image grids, metrics and evaluation use.

    ``encode(x [N, C, H, W]) -> z [N, D]`` (the deterministic representation, e.g. the posterior
    mean), ``decode(z [N, D]) -> x̂ [N, C, H, W]`` (the likelihood's mean), ``reconstruct(x)``,
    ``sample(n, generator=None) -> [n, C, H, W]`` (decoded draws from the prior).
    """

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError
