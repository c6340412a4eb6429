"""Hilbert–Schmidt independence criterion (HSIC) between paired samples, with fused memory-linear backends.

With Gram matrices K_ij = k(x_i, x_j) and L_ij = l(y_i, y_j) of the n pairs (x_i, y_i):

    biased   (Gretton et al. 2005):  HSIC_b = tr(K H L H) / (n − 1)²,   H = I − 11ᵀ/n
    unbiased (Song et al. 2012, JMLR 13, eq. 5), with K̃, L̃ the Gram matrices with zero diagonal:
             HSIC_u = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))

Both are combinations of three quantities a single streaming pass over the pairs gives: the pair sum
S = Σ K_ij L_ij and the row sums k_i = Σ_j K_ij, l_i = Σ_j L_ij (diagonal pairs left out for the
unbiased estimator), since tr(KHLH) = S − (2/n)·Σ_i k_i l_i + (Σk)(Σl)/n² and 1ᵀK̃L̃1 = Σ_i k̃_i l̃_i:

    HSIC = c1·S + c2·Σ_i k_i l_i + c3·(Σ_i k_i)(Σ_i l_i)       (coefficients: :func:`estimator_coefficients`)

Backends compute only (S, k, l) and the gradients of that combination (the contract in
``csrc/hsic.cpp``); this module validates, centres, combines and routes gradients, saving x, y and
the two row sums: O(n·(p + q)) memory in forward and backward. Kernels are those of
:mod:`aelearn.ops._kernels` plus ``"delta"`` for integer labels y (l(a, b) = [a = b]), the kernel
that censors a categorical variable.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from aelearn import _ext
from aelearn.ops import _registry
from aelearn.ops._backends import register_standard_backends
from aelearn.ops._groups import check_partition
from aelearn.ops._kernels import KERNELS, check_finite, check_sample, kernel_params, median_sq_distance
from aelearn.ops._registry import Impl

ESTIMATORS = ("biased", "unbiased")
LABEL_KERNEL = "delta"

# (atol, rtol) against a float64 evaluation of the reference. The row sums are accumulated in
# float64; atol covers estimates near 0 (independence), where HSIC is a difference of O(1) terms.
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-12, 1e-10)}

# Label ids reach the backends as floats in the input dtype: exact below 2^24 in float32.
_MAX_EXACT_LABELS = {torch.float32: 2**24, torch.float64: 2**53}


# ---------------------------------------------------------------------------------------------
# The specification
# ---------------------------------------------------------------------------------------------


def _reference_gram(a: torch.Tensor, kernel: str, params: Sequence[float], exclude_diagonal: bool) -> torch.Tensor:
    eye = torch.eye(len(a), dtype=torch.bool, device=a.device)
    if kernel == "linear":
        k = a @ a.T
    elif kernel == LABEL_KERNEL:
        k = (a[:, :1] == a[:, :1].T).to(a.dtype)
    else:
        sq = a.pow(2).sum(1)
        # The exact diagonal r_ii = 0, not the rounding residue of the expansion.
        r = (sq[:, None] + sq[None, :] - 2 * a @ a.T).clamp_min(0).masked_fill(eye, 0.0)
        if kernel == "rbf":
            k = sum(torch.exp(-gamma * r) for gamma in params)
        else:
            k = sum(c / (c + r) for c in params)
    return k.masked_fill(eye, 0.0) if exclude_diagonal else k


def reference_sums(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal):
    """(S, k, l) by materialising K and L — the specification; differentiable by autograd.

    ``x: [n, p]``, ``y: [n, q]`` (for ``"delta"``, ``[n, 1]`` label ids); returns ``S: []``,
    ``k: [n]``, ``l: [n]`` in the input dtype. ``params`` as the backends take them (γ for rbf).
    """
    K = _reference_gram(x, kernel_x, params_x, exclude_diagonal)
    L = _reference_gram(y, kernel_y, params_y, exclude_diagonal)
    return (K * L).sum(), K.sum(1), L.sum(1)


def estimator_coefficients(n: int, unbiased: bool) -> tuple[float, float, float]:
    """(c1, c2, c3) with HSIC = c1·S + c2·Σ k_i l_i + c3·(Σk)(Σl) (see the module docstring)."""
    if unbiased:
        scale = 1.0 / (n * (n - 3))
        return scale, -2.0 * scale / (n - 2), scale / ((n - 1) * (n - 2))
    scale = 1.0 / ((n - 1) * (n - 1))
    return scale, -2.0 * scale / n, scale / (n * n)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _label_ids(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer labels ``[n]`` as compact ids 0..C−1 in ``dtype``, shape ``[n, 1]`` (exactly representable)."""
    if y.dim() != 1:
        raise ValueError(f"y must be a 1-D tensor of integer labels [n] for kernel_y='delta', got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"y must hold integer labels for kernel_y='delta', got dtype {y.dtype}")
    classes, ids = torch.unique(y, return_inverse=True)
    limit = _MAX_EXACT_LABELS.get(dtype, 2**11)
    if len(classes) > limit:
        raise ValueError(f"y has {len(classes)} distinct labels; with x in {dtype} at most {limit} are exact")
    return ids.to(dtype).unsqueeze(1)


def _check_inputs(x, y, kernel_y: str, estimator: str) -> None:
    check_sample("x", x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if kernel_y != LABEL_KERNEL:
        if not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor [n, q] (for integer labels use kernel_y='delta'), got dtype {y.dtype}")
        check_sample("y", y)
        if x.dtype != y.dtype:
            raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of paired samples, got {len(x)} and {len(y)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    least = 4 if estimator == "unbiased" else 2
    if len(x) < least:
        raise ValueError(f"x and y must have at least {least} samples for the {estimator} estimator, got {len(x)}")
    check_finite("x", x)
    if kernel_y != LABEL_KERNEL:
        check_finite("y", y)


def _params(kernel: str, bandwidth, sample: torch.Tensor, side: str) -> tuple[float, ...]:
    if kernel == LABEL_KERNEL:
        if side == "x":
            raise ValueError(f"kernel_x must be one of {', '.join(KERNELS)}; 'delta' is for integer labels y")
        if bandwidth is not None:
            raise ValueError("bandwidth_y must be None for kernel_y='delta', which has no scale")
        return ()
    if side == "y" and kernel not in KERNELS:
        raise ValueError(f"kernel_y must be one of {', '.join((*KERNELS, LABEL_KERNEL))}; got {kernel!r}")
    return kernel_params(
        kernel, bandwidth, lambda: median_sq_distance(sample), kernel_name=f"kernel_{side}", bandwidths_name=f"bandwidth_{side}"
    )


# ---------------------------------------------------------------------------------------------
# Autograd and the public functions
# ---------------------------------------------------------------------------------------------


def _combine(pair_sum, row_k, row_l, coeffs) -> torch.Tensor:
    c1, c2, c3 = coeffs
    return c1 * pair_sum + c2 * (row_k * row_l).sum() + c3 * row_k.sum() * row_l.sum()


class _HSICFunction(torch.autograd.Function):
    """Routes forward and backward to a fused backend; saves x, y and the row sums, never an n×n matrix."""

    @staticmethod
    def forward(ctx, x, y, impl: Impl, kernels: tuple, exclude_diagonal: bool, coeffs: tuple[float, float, float]):
        pair_sum, row_k, row_l = impl.forward(x, y, *kernels, exclude_diagonal)
        ctx.save_for_backward(x, y, row_k, row_l)
        ctx.args = (impl, kernels, exclude_diagonal, coeffs)
        return _combine(pair_sum, row_k, row_l, coeffs).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, y, row_k, row_l = ctx.saved_tensors
        impl, kernels, exclude_diagonal, coeffs = ctx.args
        gx, gy = impl.backward(x, y, *kernels, exclude_diagonal, row_k, row_l, *coeffs)
        # Backends return fresh tensors: scaling in place saves an O(n·(p+q)) copy at the peak.
        return gx.mul_(grad_output), gy.mul_(grad_output), None, None, None, None


def hsic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel_x: str = "rbf",
    kernel_y: str = "rbf",
    bandwidth_x: float | Sequence[float] | torch.Tensor | None = None,
    bandwidth_y: float | Sequence[float] | torch.Tensor | None = None,
    estimator: str = "biased",
    backend: str | None = None,
) -> torch.Tensor:
    """HSIC between the paired samples ``x: [n, p]`` and ``y: [n, q]``; a 0-dim tensor.

    ``kernel_x``: ``"rbf"``, ``"imq"`` or ``"linear"``; ``kernel_y`` also ``"delta"``, with ``y``
    integer labels ``[n]`` (k(a, b) = 1 if a = b), e.g. to censor a categorical variable from codes.
    ``bandwidth_x`` / ``bandwidth_y``: σ values for rbf (summed kernels), scales c for imq, ``None``
    for the median heuristic of that sample alone (:func:`aelearn.ops._kernels.median_sq_distance`);
    constants, not differentiated. ``estimator``: ``"biased"`` (n ≥ 2) or ``"unbiased"`` (n ≥ 4;
    may be negative and is returned as it is). ``backend`` as for :func:`aelearn.ops.mmd`.
    Differentiable in x and (unless labels) y by every backend.
    """
    _check_inputs(x, y, kernel_y, estimator)
    params_x = _params(kernel_x, bandwidth_x, x, "x")
    params_y = _params(kernel_y, bandwidth_y, y, "y")
    # Both estimators are invariant to translating x or y (H annihilates the added row and column
    # terms of a shifted linear Gram matrix; radial kernels see distances only), so centring is
    # exact and keeps ‖a‖² + ‖b‖² − 2a·b from cancelling when data sit far from 0.
    xc = (x - x.detach().mean(0)).contiguous()
    if kernel_y == LABEL_KERNEL:
        yc = _label_ids(y, x.dtype).contiguous()
    else:
        yc = (y - y.detach().mean(0)).contiguous()
    kernels = (kernel_x, params_x, kernel_y, params_y)
    impl = _registry.select("hsic", x.device, x.dtype, xc, yc, *kernels, backend=backend)
    unbiased = estimator == "unbiased"
    coeffs = estimator_coefficients(len(x), unbiased)
    if impl.backward is None:
        return _combine(*impl.forward(xc, yc, *kernels, unbiased), coeffs)
    return _HSICFunction.apply(xc, yc, impl, kernels, unbiased, coeffs)


def reference_hsic(x, y, **kwargs) -> torch.Tensor:
    """HSIC by the materialising reference, differentiable by autograd (arguments of :func:`hsic`)."""
    return hsic(x, y, **kwargs, backend="reference")


def hsic_groups(
    z: torch.Tensor,
    groups: Sequence[Sequence[int]],
    *,
    kernel: str = "rbf",
    bandwidth: float | Sequence[float] | None = None,
    estimator: str = "biased",
    backend: str | None = None,
) -> torch.Tensor:
    """Σ over pairs of groups g < h of HSIC(z[:, G_g], z[:, G_h]): the HSIC-VAE penalty (review eq. 12).

    ``z: [n, d]``; ``groups``: index lists partitioning the d dimensions (at least two groups).
    ``bandwidth=None`` takes each group's own median heuristic; a value applies to every group.
    """
    check_sample("z", z)
    groups = check_partition(groups, z.shape[1], at_least=2)
    parts = [z[:, group] for group in groups]
    total = z.new_zeros(())
    for a, b in itertools.combinations(parts, 2):
        total = total + hsic(
            a, b, kernel_x=kernel, kernel_y=kernel, bandwidth_x=bandwidth, bandwidth_y=bandwidth,
            estimator=estimator, backend=backend,
        )
    return total


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

register_standard_backends(
    "hsic",
    reference=reference_sums,
    forward="hsic_sums",
    backward="hsic_grads",
    module="hsic",
    tolerances=TOLERANCES,
)


def _register_fake_kernels() -> None:
    """Shapes of the extension's outputs for torch.compile and FakeTensor tracing."""

    @torch.library.register_fake("aelearn::hsic_sums")
    def _(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal):
        n = x.shape[0]
        return x.new_empty((), dtype=torch.float64), x.new_empty(n, dtype=torch.float64), x.new_empty(n, dtype=torch.float64)

    @torch.library.register_fake("aelearn::hsic_grads")
    def _(x, y, kernel_x, params_x, kernel_y, params_y, exclude_diagonal, row_k, row_l, c1, c2, c3):
        return torch.empty_like(x), torch.empty_like(y)


if _ext.extension() is not None:
    _register_fake_kernels()
