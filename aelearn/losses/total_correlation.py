"""β-TCVAE's decomposed KL penalty and a total-correlation penalty, on the fused log q(z) kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aelearn.ops.log_qz import tc_decomposition, total_correlation


class BetaTCLoss(nn.Module):
    """``loss(z, mu, logvar)`` = α·MI + β·TC + γ·dim-KL (Chen et al. 2018, eq. 4), a 0-dim tensor.

    Replaces the KL term of a VAE: with α = β = γ = 1 it is the Monte Carlo estimate of
    E KL(q(z|x) ‖ N(0, I)); β-TCVAE takes α = γ = 1 and β > 1. ``z, mu, logvar: [B, D]`` with z
    sampled from q(z|x) by reparametrisation. ``dataset_size``, ``estimator`` ("mws" / "mss") and
    ``groups`` as :func:`aelearn.ops.log_qz`; the terms themselves come from
    :func:`aelearn.ops.tc_decomposition`.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        alpha: float = 1.0,
        beta: float = 6.0,
        gamma: float = 1.0,
        estimator: str = "mws",
        groups: Sequence[Sequence[int]] | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.dataset_size = dataset_size
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.estimator = estimator
        self.groups = groups
        self.backend = backend

    def forward(self, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        terms = tc_decomposition(
            z, mu, logvar, dataset_size=self.dataset_size, estimator=self.estimator, groups=self.groups, backend=self.backend
        )
        return self.alpha * terms.mutual_information + self.beta * terms.total_correlation + self.gamma * terms.dimensionwise_kl

    def extra_repr(self) -> str:
        return (
            f"dataset_size={self.dataset_size}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"estimator={self.estimator!r}, groups={self.groups!r}, backend={self.backend!r}"
        )


class TotalCorrelationLoss(nn.Module):
    """``loss(z, mu, logvar)`` = the minibatch total correlation of q(z) alone (see :func:`aelearn.ops.total_correlation`)."""

    def __init__(self, dataset_size: int, *, estimator: str = "mws", groups=None, backend: str | None = None):
        super().__init__()
        self.dataset_size = dataset_size
        self.estimator = estimator
        self.groups = groups
        self.backend = backend

    def forward(self, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return total_correlation(
            z, mu, logvar, dataset_size=self.dataset_size, estimator=self.estimator, groups=self.groups, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"dataset_size={self.dataset_size}, estimator={self.estimator!r}, groups={self.groups!r}, backend={self.backend!r}"
