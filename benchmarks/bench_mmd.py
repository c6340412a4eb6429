"""MMD² benchmarks: every backend that runs here, against the reference, on the same inputs.

Each case first checks the backend against a float64 evaluation (the reference where its n×m
matrices fit, the float64 cpp backend beyond, itself checked against the reference by the tests),
records peak extra memory, then times. Groups put all backends of one case and mode side by side;
``benchmarks/report.py`` turns the JSON into ratios against the reference of the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from peak_memory import peak_extra_bytes

import aelearn
from aelearn.ops import mmd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Above this many bytes of n×m matrices the materialising reference is not run.
REFERENCE_LIMIT_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    m: int
    d: int
    kernel: str
    scales: tuple[float, ...] | None
    rounds: int

    def inputs(self, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, self.d, generator=g)
        y = 1.1 * torch.randn(self.m, self.d, generator=g) + 0.1
        return x.to(DEVICE, dtype), y.to(DEVICE, dtype)

    def bandwidths(self):
        # Scales relative to the typical distance √(2d) of the data, so no kernel is degenerate.
        return None if self.scales is None else [s * math.sqrt(2 * self.d) for s in self.scales]

    @property
    def reference_bytes(self) -> int:
        """The reference holds about three n×m-sized float32 matrices per kernel matrix it builds."""
        return 3 * 4 * (self.n * self.n + self.m * self.m + self.n * self.m)


CPU_CASES = [
    Case("n4096-m4096-d64-rbf4", 4096, 4096, 64, "rbf", (0.25, 0.5, 1.0, 2.0), rounds=3),
    Case("n3001-m5003-d16-imq3", 3001, 5003, 16, "imq", (0.5, 1.0, 2.0), rounds=3),
    Case("n50000-m50000-d64-rbf4", 50_000, 50_000, 64, "rbf", (0.25, 0.5, 1.0, 2.0), rounds=1),
]
GPU_CASES = CPU_CASES[:2] + [Case("n65536-m65536-d64-rbf4", 65_536, 65_536, 64, "rbf", (0.25, 0.5, 1.0, 2.0), rounds=5)]
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES
BACKENDS = [name for name in aelearn.ops._registry.available("mmd", DEVICE) if not (name == "triton" and DEVICE == "cpu")]


def _float64_truth(case: Case, x, y):
    backend = "reference" if case.reference_bytes <= REFERENCE_LIMIT_BYTES else "cpp"
    xd = x.double().requires_grad_(True)
    yd = y.double().requires_grad_(True)
    value = mmd(xd, yd, kernel=case.kernel, bandwidths=case.bandwidths(), backend=backend)
    gx, gy = torch.autograd.grad(value, (xd, yd))
    return value.detach(), gx, gy


_TRUTH: dict[str, tuple] = {}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mmd(benchmark, case: Case, backend: str, mode: str):
    if backend == "reference" and case.reference_bytes > REFERENCE_LIMIT_BYTES:
        pytest.skip(f"the reference would need about {case.reference_bytes / 2**30:.0f} GiB")
    if mode == "fwd" and case.rounds == 1:
        pytest.skip("the largest case is timed forward + backward only")
    x, y = case.inputs()
    x.requires_grad_(mode == "fwd+bwd")
    y.requires_grad_(mode == "fwd+bwd")

    def run():
        value = mmd(x, y, kernel=case.kernel, bandwidths=case.bandwidths(), backend=backend)
        if mode == "fwd+bwd":
            value.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return value

    if case.name not in _TRUTH:
        _TRUTH[case.name] = _float64_truth(case, x.detach(), y.detach())
    truth, tgx, tgy = _TRUTH[case.name]
    value = run()
    value_error = abs(float(value) - float(truth)) / abs(float(truth))
    assert value_error < 1e-5, f"{backend}: relative error {value_error:.2e} against float64"
    if mode == "fwd+bwd":
        grad_error = max(float((x.grad.double() - tgx).abs().max() / tgx.abs().max()), float((y.grad.double() - tgy).abs().max() / tgy.abs().max()))
        assert grad_error < 1e-4, f"{backend}: gradient error {grad_error:.2e} of the largest entry"
    x.grad = y.grad = None

    peak = peak_extra_bytes(run, DEVICE)
    benchmark.group = f"mmd {case.name} {mode}"
    benchmark.extra_info.update(
        op="mmd",
        case=case.name,
        mode=mode,
        backend=backend,
        device=DEVICE,
        n=case.n,
        m=case.m,
        d=case.d,
        peak_extra_bytes=peak,
        relative_error=value_error,
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(run, rounds=case.rounds, iterations=1, warmup_rounds=0)
