"""HSIC benchmarks: every backend that runs here, against the reference, on the same inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from common import DEVICE, check_grads, float64_backend, measure, relative_error, synchronised, timed_backends

from aelearn.ops import hsic


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    p: int
    q: int
    estimator: str
    rounds: int

    def inputs(self, dtype=torch.float32):
        """Dependent pairs: y is a noisy nonlinear function of x."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, self.p, generator=g)
        y = torch.tanh(x[:, : self.q] if self.q <= self.p else x.repeat(1, 2)[:, : self.q]) + 0.5 * torch.randn(self.n, self.q, generator=g)
        return x.to(DEVICE, dtype), y.to(DEVICE, dtype)

    def kwargs(self):
        # One rbf bandwidth per side at the typical distance √(2·dim) of the data.
        return dict(bandwidth_x=math.sqrt(2 * self.p), bandwidth_y=math.sqrt(2 * self.q), estimator=self.estimator)

    @property
    def reference_bytes(self) -> int:
        """The reference holds about six n×n float32 matrices (K, L, distances, centring, autograd)."""
        return 6 * 4 * self.n * self.n


CPU_CASES = [
    Case("n8192-p16-q16-rbf", 8192, 16, 16, "biased", rounds=3),
    Case("n8192-p16-q16-rbf-unbiased", 8192, 16, 16, "unbiased", rounds=3),
    Case("n100000-p16-q16-rbf", 100_000, 16, 16, "biased", rounds=1),
]
GPU_CASES = CPU_CASES[:2] + [Case("n65536-p16-q16-rbf", 65_536, 16, 16, "biased", rounds=5)]
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES
_TRUTH: dict[str, tuple] = {}


def _float64_truth(case: Case, x, y):
    if case.name not in _TRUTH:
        xd = x.detach().double().requires_grad_(True)
        yd = y.detach().double().requires_grad_(True)
        value = hsic(xd, yd, **case.kwargs(), backend=float64_backend(case.reference_bytes))
        _TRUTH[case.name] = (value.detach(), *torch.autograd.grad(value, (xd, yd)))
    return _TRUTH[case.name]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", timed_backends("hsic"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hsic(benchmark, case: Case, backend: str, mode: str):
    if backend == "reference" and float64_backend(case.reference_bytes) != "reference":
        pytest.skip(f"the reference would need about {case.reference_bytes / 2**30:.0f} GiB")
    if mode == "fwd" and case.rounds == 1:
        pytest.skip("the largest case is timed forward + backward only")
    x, y = case.inputs()
    x.requires_grad_(mode == "fwd+bwd")
    y.requires_grad_(mode == "fwd+bwd")

    @synchronised
    def run():
        value = hsic(x, y, **case.kwargs(), backend=backend)
        if mode == "fwd+bwd":
            value.backward()
        return value

    truth, tgx, tgy = _float64_truth(case, x, y)
    value_error = relative_error(run(), truth)
    if mode == "fwd+bwd":
        check_grads(backend, [x.grad, y.grad], [tgx, tgy])
    x.grad = y.grad = None
    measure(benchmark, run, op="hsic", case=case.name, mode=mode, backend=backend, rounds=case.rounds,
            value_error=value_error, n=case.n, p=case.p, q=case.q)
