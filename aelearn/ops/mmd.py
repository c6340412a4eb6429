"""Maximum mean discrepancy (MMD²) between two samples, with fused memory-linear backends.

    MMD²(P, Q) = E k(x, x') + E k(y, y') − 2 E k(x, y)          (Gretton et al. 2012, JMLR 13)

estimated from ``x: [n, d] ~ P`` and ``y: [m, d] ~ Q`` by

    unbiased (U-statistic, review eq. 20):  Σ_{i≠j} k(x_i,x_j)/(n(n−1)) + Σ_{i≠j} k(y_i,y_j)/(m(m−1))
                                            − 2 Σ_{i,j} k(x_i,y_j)/(nm)
    biased (V-statistic):                   the same with every pair, divided by n², m² and nm.

Kernels, with r = ‖a − b‖²:
    ``"rbf"``     k = Σ_σ exp(−r / (2σ²))   over the bandwidths σ given
    ``"imq"``     k = Σ_c c / (c + r)        over the scales c given (Tolstikhin et al. 2018, WAE)
    ``"linear"``  k = a·b

Backends compute only the three pair sums S_xx, S_yy, S_xy and their gradients (the contract in
``csrc/mmd.cpp``); this module validates input, centres it, combines the sums and routes gradients.
The autograd function saves x and y only (O((n+m)·d)); backends recompute distances tile by tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aelearn import _ext
from aelearn.ops import _registry
from aelearn.ops._backends import register_standard_backends
from aelearn.ops._kernels import check_finite, check_sample, kernel_params, median_sq_distance
from aelearn.ops._registry import Impl

ESTIMATORS = ("unbiased", "biased")

# (atol, rtol) of every fused backend against a float64 evaluation of the reference. Sums are
# accumulated in float64 across tiles, so float32 results keep about 1e-6 relative; atol covers
# estimates near zero, where MMD² is a difference of O(1) terms.
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-12, 1e-10)}


# ---------------------------------------------------------------------------------------------
# The specification
# ---------------------------------------------------------------------------------------------


def reference_pair_sums(x: torch.Tensor, y: torch.Tensor, kernel: str, params: Sequence[float], unbiased: bool) -> torch.Tensor:
    """(S_xx, S_yy, S_xy) by materialising the three kernel matrices — the specification.

    ``x: [n, d]``, ``y: [m, d]``; ``params`` are γ_σ = 1/(2σ²) for ``"rbf"``, the scales c for
    ``"imq"``, empty for ``"linear"``. S_xx sums k(x_i, x_j) over ordered pairs, leaving out i = j
    when ``unbiased`` (otherwise r_ii = 0 exactly). Returns ``[3]`` in the input dtype;
    differentiable by autograd.
    """

    def pair_sum(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
        if kernel == "linear":
            k = a @ b.T
        else:
            r = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)
            if same:
                # The exact diagonal: r_ii = 0, not the rounding residue of the expansion.
                r = r.masked_fill(torch.eye(len(a), dtype=torch.bool, device=a.device), 0.0)
            if kernel == "rbf":
                k = sum(torch.exp(-gamma * r) for gamma in params)
            else:
                k = sum(c / (c + r) for c in params)
        if same and unbiased:
            k = k.masked_fill(torch.eye(len(a), dtype=torch.bool, device=a.device), 0.0)
        return k.sum()

    return torch.stack([pair_sum(x, x, True), pair_sum(y, y, True), pair_sum(x, y, False)])


def estimator_coefficients(n: int, m: int, unbiased: bool) -> tuple[float, float, float]:
    """(a_xx, a_yy, a_xy) with MMD² = a_xx·S_xx + a_yy·S_yy + a_xy·S_xy."""
    if unbiased:
        return 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1)), -2.0 / (n * m)
    return 1.0 / (n * n), 1.0 / (m * m), -2.0 / (n * m)


def median_heuristic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Median squared distance of the pooled sample ``[x; y]``, the default kernel scale (Gretton et al. 2012).

    The rule of :func:`aelearn.ops._kernels.median_sq_distance` on the pooled sample: an evenly
    strided subsample of at most 1024 points, the lower median over its pairs, in float64. The rbf
    default is then the single bandwidth σ = √median, the imq default the single scale c = median
    (for N(0, I) data, 2d: the WAE choice of Tolstikhin et al. 2018).
    """
    return median_sq_distance(torch.cat([x.detach(), y.detach()]))


# ---------------------------------------------------------------------------------------------
# Input checks and parameters
# ---------------------------------------------------------------------------------------------


def _check_inputs(x, y, estimator: str) -> None:
    check_sample("x", x)
    check_sample("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got x: {tuple(x.shape)} and y: {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    least = 2 if estimator == "unbiased" else 1
    for name, t in (("x", x), ("y", y)):
        if t.shape[0] < least:
            raise ValueError(
                f"{name} must have at least {least} sample{'s' if least > 1 else ''} for the {estimator} "
                f"estimator, got {t.shape[0]}"
            )
    check_finite("x", x)
    check_finite("y", y)


# ---------------------------------------------------------------------------------------------
# Autograd and the public function
# ---------------------------------------------------------------------------------------------


class _MMDFunction(torch.autograd.Function):
    """Routes forward and backward to a fused backend; saves x and y only, never an n×m matrix."""

    @staticmethod
    def forward(ctx, x, y, impl: Impl, kernel: str, params: tuple[float, ...], unbiased: bool):
        sums = impl.forward(x, y, kernel, params, unbiased)
        coeffs = estimator_coefficients(len(x), len(y), unbiased)
        ctx.save_for_backward(x, y)
        ctx.args = (impl, kernel, params, unbiased, coeffs)
        value = coeffs[0] * sums[0] + coeffs[1] * sums[1] + coeffs[2] * sums[2]
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, y = ctx.saved_tensors
        impl, kernel, params, unbiased, coeffs = ctx.args
        gx, gy = impl.backward(x, y, kernel, params, unbiased, *coeffs)
        # Backends return fresh tensors: scaling them in place saves an O((n+m)·d) copy at the peak.
        return gx.mul_(grad_output), gy.mul_(grad_output), None, None, None, None


def mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: str = "rbf",
    bandwidths: float | Sequence[float] | torch.Tensor | None = None,
    estimator: str = "unbiased",
    backend: str | None = None,
) -> torch.Tensor:
    """MMD² between the samples ``x: [n, d]`` and ``y: [m, d]`` (n and m may differ); a 0-dim tensor.

    ``bandwidths``: σ values for ``"rbf"`` (summed kernels), scales c for ``"imq"``, ``None`` for
    the median heuristic (see :func:`median_heuristic`); they are constants, not differentiated.
    ``estimator``: ``"unbiased"`` (may be negative and is returned as it is) or ``"biased"``.
    ``backend``: ``"reference"``, ``"cpp"``, ``"numba"``, ``"triton"``, ``"cuda"`` or None for the
    automatic choice (see :mod:`aelearn.ops._registry`). Differentiable in x and y by every backend.
    """
    _check_inputs(x, y, estimator)
    params = kernel_params(kernel, bandwidths, lambda: median_heuristic(x, y))
    impl = _registry.select("mmd", x.device, x.dtype, x, y, kernel, params, backend=backend)
    # Distances are translation invariant and so is MMD² for the linear kernel; centring by the
    # pooled mean keeps ‖a‖² + ‖b‖² − 2a·b from cancelling catastrophically when data sit far from 0.
    # The mean is a constant here: the translation invariance makes its gradient contribution zero.
    centre = ((x.detach().sum(0) + y.detach().sum(0)) / (len(x) + len(y))).to(x.dtype)
    xc = (x - centre).contiguous()
    yc = (y - centre).contiguous()
    unbiased = estimator == "unbiased"
    if impl.backward is None:
        sums = impl.forward(xc, yc, kernel, params, unbiased)
        a_xx, a_yy, a_xy = estimator_coefficients(len(x), len(y), unbiased)
        return a_xx * sums[0] + a_yy * sums[1] + a_xy * sums[2]
    return _MMDFunction.apply(xc, yc, impl, kernel, params, unbiased)


def reference_mmd(x, y, *, kernel: str = "rbf", bandwidths=None, estimator: str = "unbiased") -> torch.Tensor:
    """MMD² by the materialising reference, differentiable by autograd (same arguments as :func:`mmd`)."""
    return mmd(x, y, kernel=kernel, bandwidths=bandwidths, estimator=estimator, backend="reference")


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

register_standard_backends(
    "mmd",
    reference=reference_pair_sums,
    forward="mmd_sums",
    backward="mmd_grads",
    module="mmd",
    tolerances=TOLERANCES,
)


def _register_fake_kernels() -> None:
    """Shapes of the extension's outputs for torch.compile and FakeTensor tracing."""

    @torch.library.register_fake("aelearn::mmd_sums")
    def _(x, y, kernel, params, unbiased):
        return x.new_empty(3, dtype=torch.float64)

    @torch.library.register_fake("aelearn::mmd_grads")
    def _(x, y, kernel, params, unbiased, coeff_xx, coeff_yy, coeff_xy):
        return torch.empty_like(x), torch.empty_like(y)


if _ext.extension() is not None:
    _register_fake_kernels()
