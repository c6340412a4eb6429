"""What every op's benchmark does: pick the backends, check a case against float64, measure memory, time.

Each case is first checked against a float64 evaluation (the reference where its materialised
matrices fit, a float64 fused backend beyond, itself held to the reference by the tests), then its
peak extra memory is recorded, then it is timed (:func:`bench_op`). Groups put all backends of one case and mode side
by side; ``benchmarks/report.py`` turns the JSON into ratios against the reference of the same run.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from peak_memory import peak_extra_bytes

from aelearn.ops import _registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Above this many bytes of materialised matrices the reference is not run.
REFERENCE_LIMIT_BYTES = 4 * 2**30
# Accuracy every timed backend must show first: value relative to float64, gradients relative to
# the largest float64 gradient entry.
VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-4


def timed_backends(op: str) -> list[str]:
    """The backends of ``op`` that run natively on this machine (not the Triton interpreter)."""
    return [name for name in _registry.available(op, DEVICE) if not (name == "triton" and DEVICE == "cpu")]


def float64_backend(reference_bytes: int) -> str:
    """The backend that gives the float64 truth of a case: the reference where it fits."""
    if reference_bytes <= REFERENCE_LIMIT_BYTES:
        return "reference"
    return "cuda" if DEVICE == "cuda" else "cpp"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


_TRUTH: dict[tuple[str, str], tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}


def bench_op(benchmark, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], *, op: str, case: str, mode: str,
             backend: str, rounds: int, reference_bytes: int, **info) -> None:
    """Check, measure and time ``fn(*inputs, backend=backend)`` on one case, forward or forward + backward.

    ``fn`` returns the op's outputs as one tensor; the backward pass is that of its sum. ``inputs``
    are float64 (the truth is computed from them once per case); the timed call gets them in float32.
    ``reference_bytes``: what the reference would materialise, to skip it where it cannot run.
    """
    if backend == "reference" and float64_backend(reference_bytes) != "reference":
        pytest.skip(f"the reference would need about {reference_bytes / 2**30:.0f} GiB")
    if mode == "fwd" and rounds == 1:
        pytest.skip("the largest cases are timed forward + backward only")
    # The float64 truth of a case is computed once; its gradients only when a mode needs them
    # (forward-only ops have none).
    if (op, case) not in _TRUTH or (mode == "fwd+bwd" and _TRUTH[op, case][1] is None):
        leaves = [t.detach().double().requires_grad_(mode == "fwd+bwd") for t in inputs]
        outputs = fn(*leaves, backend=float64_backend(reference_bytes))
        grads = torch.autograd.grad(outputs.sum(), leaves) if mode == "fwd+bwd" else None
        _TRUTH[op, case] = (outputs.detach(), grads)
    truth, truth_grads = _TRUTH[op, case]
    leaves = [t.detach().float().requires_grad_(mode == "fwd+bwd") for t in inputs]

    @synchronised
    def run():
        outputs = fn(*leaves, backend=backend)
        if mode == "fwd+bwd":
            outputs.sum().backward()
        return outputs.detach()

    value_error = relative_error(run(), truth)
    grad_errors = [relative_error(leaf.grad, want) for leaf, want in zip(leaves, truth_grads)] if mode == "fwd+bwd" else []
    for leaf in leaves:
        leaf.grad = None
    # The float32 reference is the yardstick of speed, not of accuracy: its error is recorded only
    # (for HSIC the materialised centring costs it a few 1e-5).
    if backend != "reference":
        assert value_error < VALUE_RTOL, f"{backend}: relative error {value_error:.2e} against float64"
        assert max(grad_errors, default=0.0) < GRAD_RTOL, f"{backend}: gradient error {max(grad_errors):.2e} of the largest entry"
    peak = peak_extra_bytes(run, DEVICE)
    benchmark.group = f"{op} {case} {mode}"
    benchmark.extra_info.update(
        op=op, case=case, mode=mode, backend=backend, device=DEVICE, peak_extra_bytes=peak,
        relative_error=value_error, max_grad_error=max(grad_errors, default=None), threads=torch.get_num_threads(), **info,
    )
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)


def synchronised(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so that timings cover the whole computation."""
    if DEVICE != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run
