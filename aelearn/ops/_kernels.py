"""What the pairwise-kernel ops (MMD, HSIC) share: kernel parameters, the median heuristic and checks.

Kernels, with r = ‖a − b‖²:
    ``"rbf"``     k = Σ_σ exp(−r / (2σ²))   over the bandwidths σ given; the backends take γ = 1/(2σ²)
    ``"imq"``     k = Σ_c c / (c + r)        over the scales c given (Tolstikhin et al. 2018, WAE)
    ``"linear"``  k = a·b
"""

from __future__ import annotations

import math
from typing import Callable

import torch

RADIAL_KERNELS = ("rbf", "imq")
KERNELS = (*RADIAL_KERNELS, "linear")

# The median heuristic looks at all pairs of an evenly strided subsample of at most this many points.
MEDIAN_SUBSAMPLE = 1024


def median_sq_distance(sample: torch.Tensor) -> float:
    """Median squared distance between the points of ``sample: [N, d]``, the default kernel scale.

    Rule: take the evenly strided subsample of s = min(N, 1024) points with indices ⌊k·N/s⌋,
    k = 0..s−1 (every point when N ≤ 1024), and return the lower median of ‖p_a − p_b‖² over its
    pairs a < b, computed in float64. Memory is O(s²) whatever N is; the result is deterministic.
    """
    sample = sample.detach().double()
    total = len(sample)
    size = min(total, MEDIAN_SUBSAMPLE)
    index = torch.arange(size, device=sample.device) * total // size
    sub = sample[index]
    sub = sub - sub.mean(0)
    sq = sub.pow(2).sum(1)
    r = (sq[:, None] + sq[None, :] - 2 * sub @ sub.T).clamp_min(0)
    upper = torch.triu_indices(size, size, offset=1, device=sample.device)
    return float(r[upper[0], upper[1]].median())


def check_sample(name: str, t: object) -> None:
    """``t`` is a floating-point tensor ``[samples, features]`` with at least one feature."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [samples, features], got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor of shape [samples, features], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature, got shape {tuple(t.shape)}")


# torch.isfinite holds several temporaries of its input's size (|t| and masks: 7× a float32 input),
# so inputs are checked a slab of rows at a time.
FINITE_CHECK_ELEMENTS = 2**20


def check_finite(name: str, t: torch.Tensor) -> None:
    """``t`` holds no NaN or Inf; extra memory O(FINITE_CHECK_ELEMENTS) whatever its size."""
    # Fast path: a finite sum proves every element finite (a NaN or an infinity, once in a running
    # sum, never leaves it); only a sum that is not finite — a bad element, or finite elements whose
    # sum overflows — needs the element-wise check, which costs ~10× a sum.
    if bool(torch.isfinite(t.sum())):
        return
    if t.dim() == 0:
        slabs = [t]
    else:
        rows = max(1, FINITE_CHECK_ELEMENTS // max(1, math.prod(t.shape[1:])))
        slabs = t.split(rows)
    if not all(bool(torch.isfinite(slab).all()) for slab in slabs):
        raise ValueError(f"{name} contains NaN or Inf")


def as_positive_floats(name: str, values) -> tuple[float, ...]:
    """A positive number, a sequence of them or a tensor of them, as a tuple of floats."""
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


def kernel_params(kernel: str, bandwidths, median: Callable[[], float], *, kernel_name: str = "kernel",
                  bandwidths_name: str = "bandwidths") -> tuple[float, ...]:
    """The backend parameters of a kernel: γ = 1/(2σ²) for rbf, scales c for imq, none for linear.

    ``bandwidths=None`` takes the median heuristic, ``median()`` (called only then; see
    :func:`median_sq_distance`): the single bandwidth σ = √median for rbf (k = exp(−r / (2·median))),
    the single scale c = median for imq. ``kernel_name`` / ``bandwidths_name`` are the caller's argument names, used in errors.
    """
    if kernel not in KERNELS:
        raise ValueError(f"{kernel_name} must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "linear":
        if bandwidths is not None:
            raise ValueError(f"{bandwidths_name} must be None for {kernel_name}='linear', which has no scale")
        return ()
    if bandwidths is None:
        median = median()
        if not median > 0:
            raise ValueError(
                f"{bandwidths_name}=None uses the median heuristic, but the median pairwise distance of the "
                f"sample is 0 (most points coincide); pass {bandwidths_name} explicitly"
            )
        scales = (math.sqrt(median),) if kernel == "rbf" else (median,)
    else:
        scales = as_positive_floats(bandwidths_name, bandwidths)
    if kernel == "rbf":
        return tuple(1.0 / (2.0 * sigma * sigma) for sigma in scales)
    return scales
