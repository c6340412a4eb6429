"""The five standard backends of a fused op, registered in one call.

Every fused op follows one pattern (DESIGN.md): a materialising reference differentiated by plain
autograd, and four backends — ``cpp`` and ``cuda`` (the compiled extension, ``torch.ops.aelearn``),
``numba`` (``aelearn._numba.<module>``) and ``triton`` (``aelearn.kernels.<module>``) — that each
provide one forward and one backward function with the op's contract (``csrc/<op>.cpp``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable

import torch

from aelearn import _ext
from aelearn.ops import _registry
from aelearn.ops._registry import Impl

FLOATS = (torch.float32, torch.float64)
ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cpp_availability() -> str | None:
    reason = _ext.missing_reason()
    return None if reason is None else f"compiled extension unavailable: {reason}"


def cuda_availability() -> str | None:
    reason = cpp_availability()
    if reason is not None:
        return reason
    info = _ext.build_info()
    if not info["cuda_compiled"]:
        return "the extension was built without CUDA kernels (nvcc was not found at build time, or AELEARN_WITH_CUDA=0)"
    if not info["cuda_linked"]:
        return "the CUDA kernels were compiled but not linked: the installed torch has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


# Row indices are 32-bit in the C++ kernels (checked again inside them).
CPP_MAX_ROWS = 2**31 - 1


def cpp_row_limit(*inputs) -> list[str]:
    """Why the cpp kernels cannot take these inputs: a tensor with 2^31 − 1 rows or more."""
    rows = max(len(t) for t in inputs if isinstance(t, torch.Tensor))
    if rows >= CPP_MAX_ROWS:
        return [f"the cpp kernels take fewer than {CPP_MAX_ROWS} rows per tensor, got {rows}"]
    return []


# The CUDA kernels take kernel parameters by value in fixed-size arrays (checked again inside them).
CUDA_MAX_PARAMS = 64


def cuda_param_limit(*inputs) -> list[str]:
    """Why the cuda kernels cannot take these inputs: a kernel with more than 64 parameters."""
    counts = [len(a) for a in inputs if isinstance(a, (tuple, list))]
    if counts and max(counts) > CUDA_MAX_PARAMS:
        return [f"the cuda kernels take at most {CUDA_MAX_PARAMS} bandwidths per kernel, got {max(counts)}"]
    return []


def triton_interpreted() -> bool:
    """Whether Triton kernels run through its CPU interpreter in this process."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _import_failure(distribution: str, load: Callable) -> str | None:
    """Why a backend module cannot be imported: its library is missing, or the import failed."""
    if importlib.util.find_spec(distribution) is None:
        return f"{distribution} is not installed (pip install {distribution})"
    try:
        load()
    except ImportError as error:
        return f"importing the {distribution} kernels failed: {error}"
    return None


def _extension_op(name: str) -> Callable:
    def call(*args):
        _ext.extension()
        return getattr(torch.ops.aelearn, name)(*args)

    return call


def _module_function(module: str, name: str) -> Callable:
    def call(*args):
        return getattr(importlib.import_module(module), name)(*args)

    return call


def register_standard_backends(
    op: str,
    *,
    reference: Callable,
    forward: str,
    backward: str | None,
    module: str,
    tolerances: dict[torch.dtype, tuple[float, float]],
    cpp_input_reasons: Callable[..., list[str]] = cpp_row_limit,
    cuda_input_reasons: Callable[..., list[str]] = cuda_param_limit,
) -> None:
    """Register the reference and the four fused backends of ``op``.

    ``reference``: the materialising forward, differentiated by autograd (``backward=None``).
    ``forward`` / ``backward``: the function names, the same in the extension (``torch.ops.aelearn``),
    in ``aelearn._numba.<module>`` and in ``aelearn.kernels.<module>``. ``backward=None``: the fused
    backends provide a forward only, and the op's wrapper differentiates it in plain torch.
    """

    def backward_of(make: Callable) -> Callable | None:
        return None if backward is None else make(backward)

    numba_module = f"aelearn._numba.{module}"
    triton_module = f"aelearn.kernels.{module}"

    @functools.cache
    def numba_availability() -> str | None:
        return _import_failure("numba", lambda: importlib.import_module(numba_module))

    @functools.cache
    def triton_availability() -> str | None:
        failure = _import_failure("triton", lambda: importlib.import_module(triton_module))
        if failure is not None:
            return failure
        if not (torch.cuda.is_available() or triton_interpreted()):
            return "no CUDA device is available (on the CPU, triton runs only under TRITON_INTERPRET=1)"
        return None

    common = dict(op=op, dtypes=FLOATS, tolerances=tolerances)
    _registry.register(
        Impl(name="reference", forward=reference, backward=None, devices=("cpu", "cuda"),
             availability=lambda: None, **{**common, "dtypes": ALL_FLOATS})
    )
    _registry.register(
        Impl(name="cpp", forward=_extension_op(forward), backward=backward_of(_extension_op), devices=("cpu",),
             availability=cpp_availability, input_reasons=cpp_input_reasons, **common)
    )
    _registry.register(
        Impl(name="cuda", forward=_extension_op(forward), backward=backward_of(_extension_op), devices=("cuda",),
             availability=cuda_availability, input_reasons=cuda_input_reasons, **common)
    )
    _registry.register(
        Impl(name="numba", forward=_module_function(numba_module, forward),
             backward=backward_of(functools.partial(_module_function, numba_module)), devices=("cpu",),
             availability=numba_availability, **common)
    )
    _registry.register(
        Impl(name="triton", forward=_module_function(triton_module, forward),
             backward=backward_of(functools.partial(_module_function, triton_module)),
             devices=("cuda", "cpu") if triton_interpreted() else ("cuda",),
             availability=triton_availability, **common)
    )
