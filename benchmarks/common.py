"""What every op's benchmark does: pick the backends, check a case against float64, measure memory, time.

Each case is first checked against a float64 evaluation (the reference where its materialised
matrices fit, a float64 fused backend beyond, itself held to the reference by the tests), then its
peak extra memory is recorded, then it is timed. Groups put all backends of one case and mode side
by side; ``benchmarks/report.py`` turns the JSON into ratios against the reference of the same run.
"""

from __future__ import annotations

from typing import Callable

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


def check_grads(backend: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        error = relative_error(g, w)
        assert error < GRAD_RTOL, f"{backend}: gradient error {error:.2e} of the largest entry"


def measure(benchmark, run: Callable[[], object], *, op: str, case: str, mode: str, backend: str, rounds: int,
            value_error: float, **info) -> None:
    """Record peak extra memory and accuracy of ``run`` in the benchmark's extra info, then time it."""
    assert value_error < VALUE_RTOL, f"{backend}: relative error {value_error:.2e} against float64"
    peak = peak_extra_bytes(run, DEVICE)
    benchmark.group = f"{op} {case} {mode}"
    benchmark.extra_info.update(
        op=op, case=case, mode=mode, backend=backend, device=DEVICE, peak_extra_bytes=peak,
        relative_error=value_error, threads=torch.get_num_threads(), **info,
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
