"""MMD² benchmarks: every backend that runs here, against the reference, on the same inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from common import DEVICE, bench_op, timed_backends

from aelearn.ops import mmd


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    m: int
    d: int
    kernel: str
    scales: tuple[float, ...]
    rounds: int

    def inputs(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, self.d, generator=g, dtype=torch.float64)
        y = 1.1 * torch.randn(self.m, self.d, generator=g, dtype=torch.float64) + 0.1
        return [x.to(DEVICE), y.to(DEVICE)]

    def op(self, x, y, backend):
        # Scales relative to the typical distance √(2d) of the data, so no kernel is degenerate.
        bandwidths = [s * math.sqrt(2 * self.d) for s in self.scales]
        return mmd(x, y, kernel=self.kernel, bandwidths=bandwidths, backend=backend)

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


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", timed_backends("mmd"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mmd(benchmark, case: Case, backend: str, mode: str):
    bench_op(benchmark, case.op, case.inputs(), op="mmd", case=case.name, mode=mode, backend=backend,
             rounds=case.rounds, reference_bytes=case.reference_bytes, n=case.n, m=case.m, d=case.d)
