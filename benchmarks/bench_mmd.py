"""MMD² benchmarks: every backend that runs here, against the reference, on the same inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from common import DEVICE, check_grads, float64_backend, measure, relative_error, synchronised, timed_backends

from aelearn.ops import mmd


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
_TRUTH: dict[str, tuple] = {}


def _float64_truth(case: Case, x, y):
    if case.name not in _TRUTH:
        xd = x.detach().double().requires_grad_(True)
        yd = y.detach().double().requires_grad_(True)
        value = mmd(xd, yd, kernel=case.kernel, bandwidths=case.bandwidths(), backend=float64_backend(case.reference_bytes))
        _TRUTH[case.name] = (value.detach(), *torch.autograd.grad(value, (xd, yd)))
    return _TRUTH[case.name]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", timed_backends("mmd"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mmd(benchmark, case: Case, backend: str, mode: str):
    if backend == "reference" and float64_backend(case.reference_bytes) != "reference":
        pytest.skip(f"the reference would need about {case.reference_bytes / 2**30:.0f} GiB")
    if mode == "fwd" and case.rounds == 1:
        pytest.skip("the largest case is timed forward + backward only")
    x, y = case.inputs()
    x.requires_grad_(mode == "fwd+bwd")
    y.requires_grad_(mode == "fwd+bwd")

    @synchronised
    def run():
        value = mmd(x, y, kernel=case.kernel, bandwidths=case.bandwidths(), backend=backend)
        if mode == "fwd+bwd":
            value.backward()
        return value

    truth, tgx, tgy = _float64_truth(case, x, y)
    value_error = relative_error(run(), truth)
    if mode == "fwd+bwd":
        check_grads(backend, [x.grad, y.grad], [tgx, tgy])
    x.grad = y.grad = None
    measure(benchmark, run, op="mmd", case=case.name, mode=mode, backend=backend, rounds=case.rounds,
            value_error=value_error, n=case.n, m=case.m, d=case.d)
