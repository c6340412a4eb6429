"""HSIC benchmarks: every backend that runs here, against the reference, on the same inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from common import DEVICE, bench_op, timed_backends

from aelearn.ops import hsic


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    p: int
    q: int
    estimator: str
    rounds: int

    def inputs(self):
        """Dependent pairs: y is a noisy nonlinear function of the first q coordinates of x (q ≤ p)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, self.p, generator=g, dtype=torch.float64)
        y = torch.tanh(x[:, : self.q]) + 0.5 * torch.randn(self.n, self.q, generator=g, dtype=torch.float64)
        return [x.to(DEVICE), y.to(DEVICE)]

    def op(self, x, y, backend):
        # One rbf bandwidth per side at the typical distance √(2·dim) of the data.
        return hsic(x, y, bandwidth_x=math.sqrt(2 * self.p), bandwidth_y=math.sqrt(2 * self.q), estimator=self.estimator, backend=backend)

    @property
    def reference_bytes(self) -> int:
        """The reference holds about six n×n float32 matrices (K, L, distances, autograd)."""
        return 6 * 4 * self.n * self.n


CPU_CASES = [
    Case("n8192-p16-q16-rbf", 8192, 16, 16, "biased", rounds=3),
    Case("n8192-p16-q16-rbf-unbiased", 8192, 16, 16, "unbiased", rounds=3),
    Case("n100000-p16-q16-rbf", 100_000, 16, 16, "biased", rounds=1),
]
GPU_CASES = CPU_CASES[:2] + [Case("n65536-p16-q16-rbf", 65_536, 16, 16, "biased", rounds=5)]
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", timed_backends("hsic"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hsic(benchmark, case: Case, backend: str, mode: str):
    bench_op(benchmark, case.op, case.inputs(), op="hsic", case=case.name, mode=mode, backend=backend,
             rounds=case.rounds, reference_bytes=case.reference_bytes, n=case.n, p=case.p, q=case.q)
