"""HSIC as a loss: independence between two representations, or between latent groups (HSIC-VAE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aelearn.ops.hsic import hsic, hsic_groups


class HSICLoss(nn.Module):
    """``loss(x, y)`` = HSIC(x, y) for paired ``x: [n, p]`` and ``y: [n, q]`` (or labels ``[n]``
    with ``kernel_y="delta"``, to censor a categorical variable from codes, review §3.4).

    With ``groups`` given, ``loss(z)`` is instead the sum of HSIC over all pairs of the latent
    groups of ``z`` (HSIC-VAE, review eq. 12; see :func:`aelearn.ops.hsic_groups`). Other
    arguments as :func:`aelearn.ops.hsic`.
    """

    def __init__(
        self,
        kernel_x: str = "rbf",
        kernel_y: str = "rbf",
        bandwidth_x: float | Sequence[float] | None = None,
        bandwidth_y: float | Sequence[float] | None = None,
        estimator: str = "biased",
        groups: Sequence[Sequence[int]] | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if groups is not None and (kernel_x != kernel_y or bandwidth_x != bandwidth_y):
            raise ValueError("with groups, one kernel serves every group: give kernel_x == kernel_y and bandwidth_x == bandwidth_y")
        self.kernel_x, self.kernel_y = kernel_x, kernel_y
        self.bandwidth_x, self.bandwidth_y = bandwidth_x, bandwidth_y
        self.estimator = estimator
        self.groups = groups
        self.backend = backend

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.groups is not None:
            if y is not None:
                raise ValueError("HSICLoss with groups takes one tensor z: call loss(z)")
            return hsic_groups(
                x, self.groups, kernel=self.kernel_x, bandwidth=self.bandwidth_x, estimator=self.estimator, backend=self.backend
            )
        if y is None:
            raise ValueError("HSICLoss without groups takes two paired tensors: call loss(x, y)")
        return hsic(
            x, y, kernel_x=self.kernel_x, kernel_y=self.kernel_y, bandwidth_x=self.bandwidth_x, bandwidth_y=self.bandwidth_y,
            estimator=self.estimator, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_x={self.kernel_x!r}, kernel_y={self.kernel_y!r}, bandwidth_x={self.bandwidth_x!r}, "
            f"bandwidth_y={self.bandwidth_y!r}, estimator={self.estimator!r}, groups={self.groups!r}, backend={self.backend!r}"
        )
