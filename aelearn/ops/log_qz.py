"""log q(z) of the aggregate posterior from a minibatch, and the β-TCVAE decomposition built on it.

The aggregate posterior q(z) = (1/N) Σ_n q(z|x_n) of a dataset of N points is estimated at the
codes z_i ~ q(z|x_i) of a minibatch of B points (Chen et al. 2018, "Isolating Sources of
Disentanglement in VAEs", §4 and Appendix C) by

    log q(z_i)     ≈ logsumexp_j ( Σ_d       log N(z_id; μ_jd, σ²_jd) + log w_ij )
    log q(z_i,G)   ≈ logsumexp_j ( Σ_{d ∈ G} log N(z_id; μ_jd, σ²_jd) + log w_ij )   for each group G

with the minibatch weights
    MWS (weighted):   w_ij = 1/(N·B)
    MSS (stratified): w_ii = 1/N,  w_i,(i+1 mod B) = (N − B + 1)/(N·(B − 1)),  every other w_ij = 1/(B − 1)
(each row of the MSS weights sums to 1; the stratum of the next index wraps around to j = 0 for the
last row — a copy of this matrix that fills it by a strided view misplaces that last entry).

Backends compute only the two log-sum-exps and their gradients (the contract in ``csrc/log_qz.cpp``):
an online log-sum-exp over j for the joint and every group, never a B×B×D or B×B tensor, and a
backward that recomputes from the saved log-sum-exps, as FlashAttention does. Memory O(B·(D + G)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from aelearn import _ext
from aelearn.ops import _registry
from aelearn.ops._backends import register_standard_backends
from aelearn.ops._groups import check_partition
from aelearn.ops._kernels import check_finite, check_sample
from aelearn.ops._registry import Impl

ESTIMATORS = ("mws", "mss")
PRIORS = ("normal",)
LOG_2PI = math.log(2.0 * math.pi)

# (atol, rtol) against a float64 evaluation of the reference: log-densities are sums of D terms
# of order 1–100, so float32 keeps ~1e-6 relative; atol covers values near 0.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


# ---------------------------------------------------------------------------------------------
# The specification
# ---------------------------------------------------------------------------------------------


def log_weights(batch_size: int, dataset_size: int, estimator: str) -> tuple[float, float, float]:
    """(log w_self, log w_next, log w_other): the log-weights of j = i, j = i + 1 mod B and the rest."""
    if estimator == "mws":
        w = -math.log(dataset_size * batch_size)
        return w, w, w
    b, n = batch_size, dataset_size
    # N ≥ B (checked) keeps N − B + 1 ≥ 1, so every weight is positive.
    return -math.log(n), math.log(n - b + 1) - math.log(n * (b - 1)), -math.log(b - 1)


def reference_log_qz(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other):
    """(log q(z_i) [B], log q(z_i,G) [B, G]) by materialising all B×B×D log-densities — the specification.

    ``z, mu, logvar: [B, D]``; ``group_of_dim: [D]`` int64, the group of every dimension.
    Differentiable by autograd.
    """
    batch = len(z)
    log_density = -0.5 * (LOG_2PI + logvar[None] + (z[:, None] - mu[None]).pow(2) * torch.exp(-logvar[None]))
    index = torch.arange(batch, device=z.device)
    w = torch.full((batch, batch), log_w_other, dtype=z.dtype, device=z.device)
    w[index, (index + 1) % batch] = log_w_next
    w[index, index] = log_w_self
    joint = torch.logsumexp(log_density.sum(-1) + w, dim=1)
    group_sums = log_density.new_zeros(batch, batch, num_groups).index_add_(2, group_of_dim, log_density)
    return joint, torch.logsumexp(group_sums + w[..., None], dim=1)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_inputs(z, mu, logvar, dataset_size, estimator: str) -> None:
    for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
        check_sample(name, t)
        check_finite(name, t)
    for name, t in (("mu", mu), ("logvar", logvar)):
        if t.shape != z.shape:
            raise ValueError(f"{name} must have the shape of z {tuple(z.shape)}, got {tuple(t.shape)}")
        if t.dtype != z.dtype:
            raise TypeError(f"{name} must have the dtype of z ({z.dtype}), got {t.dtype}")
        if t.device != z.device:
            raise ValueError(f"{name} must be on z's device ({z.device}), got {t.device}")
    batch = z.shape[0]
    if batch < 1:
        raise ValueError(f"z must hold at least one sample, got shape {tuple(z.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int):
        raise TypeError(f"dataset_size must be an int (the number N of points in the dataset), got {dataset_size!r}")
    if dataset_size < batch:
        raise ValueError(f"dataset_size must be at least the batch size {batch}, got {dataset_size}")
    if estimator == "mss" and batch < 3:
        raise ValueError(f"the mss estimator needs a batch of at least 3 samples, got {batch}")


def group_index(groups: Sequence[Sequence[int]] | None, dim: int, device) -> tuple[torch.Tensor, int]:
    """The group of every dimension (``[dim]`` int64) and the number of groups; None: one per dimension."""
    if groups is None:
        return torch.arange(dim, device=device), dim
    groups = check_partition(groups, dim)
    owner = torch.empty(dim, dtype=torch.int64)
    for g, group in enumerate(groups):
        owner[group] = g
    return owner.to(device), len(groups)


# ---------------------------------------------------------------------------------------------
# Autograd and the public functions
# ---------------------------------------------------------------------------------------------


class _LogQzFunction(torch.autograd.Function):
    """Routes forward and backward to a fused backend; saves inputs and the two log-sum-exps only."""

    @staticmethod
    def forward(ctx, z, mu, logvar, impl: Impl, group_of_dim, num_groups: int, weights: tuple[float, float, float]):
        joint, groups = impl.forward(z, mu, logvar, group_of_dim, num_groups, *weights)
        ctx.save_for_backward(z, mu, logvar, group_of_dim, joint, groups)
        ctx.args = (impl, num_groups, weights)
        return joint, groups

    @staticmethod
    def backward(ctx, grad_joint, grad_groups):
        z, mu, logvar, group_of_dim, joint, groups = ctx.saved_tensors
        impl, num_groups, weights = ctx.args
        grad_joint = torch.zeros_like(joint) if grad_joint is None else grad_joint.contiguous()
        grad_groups = torch.zeros_like(groups) if grad_groups is None else grad_groups.contiguous()
        gz, gmu, glogvar = impl.backward(
            z, mu, logvar, group_of_dim, num_groups, *weights, joint, groups, grad_joint, grad_groups
        )
        return gz, gmu, glogvar, None, None, None, None


def log_qz(
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    dataset_size: int,
    estimator: str = "mws",
    groups: Sequence[Sequence[int]] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minibatch estimates of log q(z_i) ``[B]`` and of the group marginals log q(z_i,G) ``[B, G]``.

    ``z, mu, logvar: [B, D]``: codes z_i sampled from q(z|x_i) = N(mu_i, diag(exp(logvar_i))).
    ``dataset_size``: N ≥ B, the number of points the batch was drawn from. ``estimator``:
    ``"mws"`` or ``"mss"`` (B ≥ 3), see the module docstring. ``groups``: None for one group per
    dimension (the marginals log q(z_j) of β-TCVAE), or index lists partitioning the D dimensions
    (HFVAE's groups). Differentiable in z, mu and logvar by every backend.
    """
    _check_inputs(z, mu, logvar, dataset_size, estimator)
    group_of_dim, num_groups = group_index(groups, z.shape[1], z.device)
    weights = log_weights(len(z), dataset_size, estimator)
    z, mu, logvar = z.contiguous(), mu.contiguous(), logvar.contiguous()
    impl = _registry.select("log_qz", z.device, z.dtype, z, mu, logvar, group_of_dim, num_groups, backend=backend)
    if impl.backward is None:
        return impl.forward(z, mu, logvar, group_of_dim, num_groups, *weights)
    return _LogQzFunction.apply(z, mu, logvar, impl, group_of_dim, num_groups, weights)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Σ_d log N(z_d; mu_d, exp(logvar_d)) over the last dimension, constants included."""
    return (-0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))).sum(-1)


def total_correlation(
    z, mu, logvar, *, dataset_size: int, estimator: str = "mws", groups=None, backend: str | None = None
) -> torch.Tensor:
    """TC = mean_i [log q(z_i) − Σ_G log q(z_i,G)], a 0-dim tensor (arguments of :func:`log_qz`)."""
    joint, marginals = log_qz(z, mu, logvar, dataset_size=dataset_size, estimator=estimator, groups=groups, backend=backend)
    return (joint - marginals.sum(1)).mean()


class TCDecomposition(NamedTuple):
    """The three terms of E_x KL(q(z|x) ‖ p(z)) in β-TCVAE (Chen et al. 2018, eq. 2), each a 0-dim tensor."""

    mutual_information: torch.Tensor  # index-code MI: E[log q(z|x) − log q(z)]
    total_correlation: torch.Tensor  # E[log q(z) − Σ_G log q(z_G)]
    dimensionwise_kl: torch.Tensor  # E[Σ_G log q(z_G) − log p(z)]


def tc_decomposition(
    z, mu, logvar, *, dataset_size: int, estimator: str = "mws", prior: str = "normal", groups=None, backend: str | None = None
) -> TCDecomposition:
    """Index-code MI, total correlation and dimension-wise KL estimated on the minibatch.

    Every log-density keeps its constants, so the three terms add up, sample by sample, to
    mean_i [log q(z_i|x_i) − log p(z_i)], the Monte Carlo estimate of E KL(q(z|x) ‖ p(z)).
    ``prior="normal"``: p(z) = N(0, I). Other arguments as :func:`log_qz`.
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}; got {prior!r}")
    joint, marginals = log_qz(z, mu, logvar, dataset_size=dataset_size, estimator=estimator, groups=groups, backend=backend)
    log_posterior = gaussian_log_density(z, mu, logvar)
    log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
    marginal_sum = marginals.sum(1)
    return TCDecomposition(
        mutual_information=(log_posterior - joint).mean(),
        total_correlation=(joint - marginal_sum).mean(),
        dimensionwise_kl=(marginal_sum - log_prior).mean(),
    )


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

register_standard_backends(
    "log_qz",
    reference=reference_log_qz,
    forward="log_qz_forward",
    backward="log_qz_backward",
    module="log_qz",
    tolerances=TOLERANCES,
)


def _register_fake_kernels() -> None:
    """Shapes of the extension's outputs for torch.compile and FakeTensor tracing."""

    @torch.library.register_fake("aelearn::log_qz_forward")
    def _(z, mu, logvar, group_of_dim, num_groups, log_w_self, log_w_next, log_w_other):
        return z.new_empty(z.shape[0]), z.new_empty(z.shape[0], num_groups)

    @torch.library.register_fake("aelearn::log_qz_backward")
    def _(z, mu, logvar, group_of_dim, num_groups, w_self, w_next, w_other, joint, groups, grad_joint, grad_groups):
        return torch.empty_like(z), torch.empty_like(mu), torch.empty_like(logvar)


if _ext.extension() is not None:
    _register_fake_kernels()
