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

import functools
import importlib.util
import math
import os
from collections.abc import Sequence

import torch

from aelearn import _ext
from aelearn.ops import _registry
from aelearn.ops._registry import Impl

KERNELS = ("rbf", "imq", "linear")
ESTIMATORS = ("unbiased", "biased")

# The median heuristic looks at all pairs of an evenly strided subsample of at most this many points.
MEDIAN_SUBSAMPLE = 1024

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
    """Median squared distance of the pooled sample, the default kernel scale (Gretton et al. 2012).

    Rule: pool ``[x; y]`` (N = n + m points), take the evenly strided subsample of
    s = min(N, 1024) points with indices ⌊k·N/s⌋, k = 0..s−1 (every point when N ≤ 1024), and
    return the lower median of ‖p_a − p_b‖² over its pairs a < b, computed in float64. Memory is
    O(s²) whatever n and m are; the result is deterministic. The rbf default is then the single
    bandwidth σ = √median (so k = exp(−r / (2·median))), the imq default the single scale
    c = median (for N(0, I) data, 2d: the WAE choice of Tolstikhin et al. 2018).
    """
    pooled = torch.cat([x.detach(), y.detach()]).double()
    total = len(pooled)
    size = min(total, MEDIAN_SUBSAMPLE)
    index = torch.arange(size, device=pooled.device) * total // size
    sample = pooled[index]
    sample = sample - sample.mean(0)
    sq = sample.pow(2).sum(1)
    r = (sq[:, None] + sq[None, :] - 2 * sample @ sample.T).clamp_min(0)
    upper = torch.triu_indices(size, size, offset=1, device=pooled.device)
    return float(r[upper[0], upper[1]].median())


# ---------------------------------------------------------------------------------------------
# Input checks and parameters
# ---------------------------------------------------------------------------------------------


def _check_sample(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [samples, features], got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor of shape [samples, features], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature, got shape {tuple(t.shape)}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _as_floats(name: str, values) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    elif isinstance(values, (int, float)):
        values = [values]
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number or a sequence of positive numbers, got {values!r}") from None
    if not floats:
        raise ValueError(f"{name} must not be empty")
    for v in floats:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive and finite, got {v}")
    return floats


def kernel_params(kernel: str, bandwidths, x: torch.Tensor, y: torch.Tensor) -> tuple[float, ...]:
    """The backend parameters of a kernel: γ = 1/(2σ²) for rbf, scales c for imq, none for linear."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "linear":
        if bandwidths is not None:
            raise ValueError("bandwidths must be None for kernel='linear', which has no scale")
        return ()
    if bandwidths is None:
        median = median_heuristic(x, y)
        if not median > 0:
            raise ValueError(
                "bandwidths=None uses the median heuristic, but the median pairwise distance of the "
                "pooled sample is 0 (most points coincide); pass bandwidths explicitly"
            )
        scales = (math.sqrt(median),) if kernel == "rbf" else (median,)
    else:
        scales = _as_floats("bandwidths", bandwidths)
    if kernel == "rbf":
        return tuple(1.0 / (2.0 * sigma * sigma) for sigma in scales)
    return scales


def _check_inputs(x, y, estimator: str) -> None:
    _check_sample("x", x)
    _check_sample("y", y)
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
    _check_finite("x", x)
    _check_finite("y", y)


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
    params = kernel_params(kernel, bandwidths, x, y)
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

_FLOATS = (torch.float32, torch.float64)


def _cpp_availability() -> str | None:
    reason = _ext.missing_reason()
    return None if reason is None else f"compiled extension unavailable: {reason}"


def _cuda_availability() -> str | None:
    reason = _cpp_availability()
    if reason is not None:
        return reason
    info = _ext.build_info()
    if not info["cuda_compiled"]:
        return "the extension was built without CUDA kernels (nvcc was not found at build time)"
    if not info["cuda_linked"]:
        return "the CUDA kernels were compiled but not linked: the installed torch has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


@functools.cache
def _numba_module():
    from aelearn._numba import mmd as numba_mmd

    return numba_mmd


def _import_failure(distribution: str, load) -> str | None:
    """Why a backend module cannot be imported: its library is missing, or the import failed."""
    if importlib.util.find_spec(distribution) is None:
        return f"{distribution} is not installed (pip install {distribution})"
    try:
        load()
    except ImportError as error:
        return f"importing the {distribution} kernels failed: {error}"
    return None


@functools.cache
def _numba_availability() -> str | None:
    return _import_failure("numba", _numba_module)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def _triton_module():
    from aelearn.kernels import mmd as triton_mmd

    return triton_mmd


@functools.cache
def _triton_availability() -> str | None:
    failure = _import_failure("triton", _triton_module)
    if failure is not None:
        return failure
    if not (torch.cuda.is_available() or _triton_interpreted()):
        return "no CUDA device is available (on the CPU, triton runs only under TRITON_INTERPRET=1)"
    return None


# Limits of the compiled kernels (checked again inside them): row indices are 32-bit in the C++
# kernels, and the CUDA kernels pass the bandwidths by value in a fixed-size array.
_CPP_MAX_SAMPLES = 2**31 - 1
_CUDA_MAX_PARAMS = 64


def _cpp_input_reasons(x, y, kernel, params) -> list[str]:
    if max(len(x), len(y)) >= _CPP_MAX_SAMPLES:
        return [f"the cpp kernels take fewer than {_CPP_MAX_SAMPLES} samples per side"]
    return []


def _cuda_input_reasons(x, y, kernel, params) -> list[str]:
    if len(params) > _CUDA_MAX_PARAMS:
        return [f"the cuda kernels take at most {_CUDA_MAX_PARAMS} bandwidths, got {len(params)}"]
    return []


def _extension_op(name: str):
    def call(*args):
        _ext.extension()
        return getattr(torch.ops.aelearn, name)(*args)

    return call


_registry.register(
    Impl(
        op="mmd",
        name="reference",
        # Differentiated by autograd through the materialised matrices (backward=None): this is
        # the natural plain-PyTorch implementation that the fused backends are measured against.
        forward=reference_pair_sums,
        backward=None,
        devices=("cpu", "cuda"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        availability=lambda: None,
        tolerances=TOLERANCES,
    )
)
_registry.register(
    Impl(
        op="mmd",
        name="cpp",
        forward=_extension_op("mmd_sums"),
        backward=_extension_op("mmd_grads"),
        devices=("cpu",),
        dtypes=_FLOATS,
        availability=_cpp_availability,
        input_reasons=_cpp_input_reasons,
        tolerances=TOLERANCES,
    )
)
_registry.register(
    Impl(
        op="mmd",
        name="cuda",
        forward=_extension_op("mmd_sums"),
        backward=_extension_op("mmd_grads"),
        devices=("cuda",),
        dtypes=_FLOATS,
        availability=_cuda_availability,
        input_reasons=_cuda_input_reasons,
        tolerances=TOLERANCES,
    )
)
_registry.register(
    Impl(
        op="mmd",
        name="numba",
        forward=lambda *args: _numba_module().mmd_sums(*args),
        backward=lambda *args: _numba_module().mmd_grads(*args),
        devices=("cpu",),
        dtypes=_FLOATS,
        availability=_numba_availability,
        tolerances=TOLERANCES,
    )
)
_registry.register(
    Impl(
        op="mmd",
        name="triton",
        forward=lambda *args: _triton_module().mmd_sums(*args),
        backward=lambda *args: _triton_module().mmd_grads(*args),
        devices=("cuda", "cpu") if _triton_interpreted() else ("cuda",),
        dtypes=_FLOATS,
        availability=_triton_availability,
        tolerances=TOLERANCES,
    )
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
