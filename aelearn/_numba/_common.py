"""Building blocks shared by the numba kernels: the jit decorator, fast-math flag sets, a vectorisable
exp and expm1 for non-positive arguments and the input check of the entry points."""

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["REDUCE_FLAGS", "FMA_FLAGS", "jit", "exp_nonpositive", "expm1_nonpositive", "checked_numpy"]

# Fast-math flags for loops whose only licence needed is reordering of sums (vectorised reductions)
# and fused multiply-add. No nnan/ninf/afn: masking, clamping and the exp range checks must keep
# IEEE semantics.
REDUCE_FLAGS = {"reassoc", "contract", "nsz"}
# Only FMA contraction: for the exp approximation (reassociation would undo the Cody-Waite split) and
# the tile products (no reductions to vectorise, so the summation order stays as written).
FMA_FLAGS = {"contract"}


def jit(**options):
    """``numba.njit(cache=True, nogil=True, error_model="numpy", **options)``, minus the cache if impossible.

    error_model="numpy" lets x / 0 follow IEEE instead of raising; the Python-style zero check would put
    a branch into every division and stop the imq loops from vectorising.

    Numba caches next to the source file, or in the user-wide cache directory when the package is
    installed read-only; when neither is writable it refuses ``cache=True`` at decoration time, and the
    function is then compiled per process instead of failing the import.
    """

    def decorate(function):
        try:
            return numba.njit(cache=True, nogil=True, error_model="numpy", **options)(function)
        except RuntimeError:
            return numba.njit(cache=False, nogil=True, error_model="numpy", **options)(function)

    return decorate


@intrinsic
def _bits_to_float(typingctx, bits):
    """Reinterpret the bits of an int32 as float32 or of an int64 as float64 (a free register move)."""
    if bits == types.int32:
        result, llvm_type = types.float32, ir.FloatType()
    elif bits == types.int64:
        result, llvm_type = types.float64, ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)

    return result(bits), codegen


def exp_nonpositive(v):
    """exp(v) for v <= 0, in the precision of ``v``; only usable from jitted code (see the overload)."""
    raise NotImplementedError("exp_nonpositive is implemented for numba only")


def expm1_nonpositive(v):
    """exp(v) - 1 for v <= 0, accurate near 0, in the precision of ``v``; only usable from jitted code."""
    raise NotImplementedError("expm1_nonpositive is implemented for numba only")


# Without Intel SVML, LLVM turns math.exp inside a loop into one scalar libm call per element and the
# loop no longer vectorises. This exp is branch-free arithmetic, so the tile loops vectorise around it.
# Method: Cody-Waite reduction v = k ln2 + f with |f| <= ln2/2 (ln2 split so that k * hi is exact),
# Taylor polynomial for exp(f), and 2^k built directly in the exponent bits. Arguments at or below
# -87 (float32) / -708 (float64) return 0: the true value is below 1.7e-38 / 3.4e-308, negligible next
# to the kernel's value 1 at r = 0, and 2^k would leave the normal range. The comparisons are written
# so that a NaN argument falls through to a NaN result instead of being clamped away.
_F32_LOG2E = np.float32(1.4426950408889634)
_F32_LN2_HI = np.float32(0.693145751953125)  # 15 significant bits: k * hi is exact for |k| < 512
_F32_LN2_LO = np.float32(1.428606765330187e-06)
_F32_MIN_ARG = np.float32(-87.0)  # exp(-87) = 1.6e-38, still normal; k >= -126
# Degree 7: truncation error (ln2/2)^8 / 8! = 5e-9, below float32 rounding (6e-8).
_F32_TAYLOR = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))

_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93147180369123816490e-01  # 32 significant bits: k * hi is exact for |k| < 2^21
_F64_LN2_LO = 1.90821492927058770002e-10
_F64_MIN_ARG = -708.0  # exp(-708) = 3.3e-308, still normal; k >= -1021
# Degree 12: truncation error (ln2/2)^13 / 13! = 1.7e-16, below float64 rounding.
_F64_TAYLOR = tuple(1.0 / math.factorial(i) for i in range(13))


# The reduction and the polynomial are shared by exp and expm1 and inlined into them at the numba IR
# level, so that the loops calling them still vectorise. ``_reduced_*(v)`` returns ``(q, f, scale)``
# with ``exp(v) = (1 + f q) scale`` for v above the minimal argument: q is the Taylor polynomial of
# (exp(f) - 1) / f, and keeping the 1 apart lets expm1 avoid the cancellation of exp(f) - 1 near 0.
@jit(fastmath=FMA_FLAGS, inline="always")
def _reduced_f32(v):
    t = _F32_MIN_ARG if v < _F32_MIN_ARG else v
    k = np.floor(t * _F32_LOG2E + np.float32(0.5))
    f = (t - k * _F32_LN2_HI) - k * _F32_LN2_LO
    c = _F32_TAYLOR
    q = c[7]
    q = q * f + c[6]
    q = q * f + c[5]
    q = q * f + c[4]
    q = q * f + c[3]
    q = q * f + c[2]
    q = q * f + c[1]
    scale = _bits_to_float(np.int32((np.int32(k) + 127) << 23))
    return q, f, scale


@jit(fastmath=FMA_FLAGS, inline="always")
def _reduced_f64(v):
    t = _F64_MIN_ARG if v < _F64_MIN_ARG else v
    k = np.floor(t * _F64_LOG2E + 0.5)
    f = (t - k * _F64_LN2_HI) - k * _F64_LN2_LO
    c = _F64_TAYLOR
    q = c[12]
    q = q * f + c[11]
    q = q * f + c[10]
    q = q * f + c[9]
    q = q * f + c[8]
    q = q * f + c[7]
    q = q * f + c[6]
    q = q * f + c[5]
    q = q * f + c[4]
    q = q * f + c[3]
    q = q * f + c[2]
    q = q * f + c[1]
    scale = _bits_to_float((np.int64(k) + 1023) << 52)
    return q, f, scale


def _exp_f32(v):
    q, f, scale = _reduced_f32(v)
    return np.float32(0.0) if v <= _F32_MIN_ARG else (q * f + _F32_TAYLOR[0]) * scale


def _exp_f64(v):
    q, f, scale = _reduced_f64(v)
    return 0.0 if v <= _F64_MIN_ARG else (q * f + _F64_TAYLOR[0]) * scale


# expm1(v) = scale (exp(f) - 1) + (scale - 1) = (f q) scale + (scale - 1). For k = 0 (|v| <= ln2/2)
# this is f q, accurate to about an ulp however small v is; for k <= -1 both terms have magnitude
# at most 1/2 and opposite signs with |result| >= 0.29, so the sum cancels at most two bits. At or
# below the minimal argument exp(v) is negligible and the result is -1.
def _expm1_f32(v):
    q, f, scale = _reduced_f32(v)
    return np.float32(-1.0) if v <= _F32_MIN_ARG else (f * q) * scale + (scale - np.float32(1.0))


def _expm1_f64(v):
    q, f, scale = _reduced_f64(v)
    return -1.0 if v <= _F64_MIN_ARG else (f * q) * scale + (scale - 1.0)


@overload(exp_nonpositive, jit_options={"fastmath": FMA_FLAGS})
def exp_nonpositive_impl(v):
    if v == types.float32:
        return _exp_f32
    if v == types.float64:
        return _exp_f64
    return None


@overload(expm1_nonpositive, jit_options={"fastmath": FMA_FLAGS})
def expm1_nonpositive_impl(v):
    if v == types.float32:
        return _expm1_f32
    if v == types.float64:
        return _expm1_f64
    return None


def checked_numpy(tensor, name, shape, dtype):
    """The tensor as a numpy array (no copy), after checking it is a contiguous CPU tensor of that
    shape and dtype; ``None`` in ``shape`` accepts any size there."""
    # Written for speed as well (~1 µs a tensor): ops called per decoded pixel check a dozen tensors
    # per call. tensor.is_cpu avoids building a device object, the exact shape comparison skips the
    # per-dimension loop when ``shape`` has no None, and detach() is only paid for when needed.
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {tensor.device}")
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tensor.shape != shape and (
        tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape))
    ):
        expected = ", ".join("*" if want is None else str(want) for want in shape)
        raise ValueError(f"{name} must have shape [{expected}], got {list(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return (tensor.detach() if tensor.requires_grad else tensor).numpy()
