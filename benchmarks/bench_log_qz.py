"""log q(z) (β-TCVAE, MWS / MSS) benchmarks: every backend that runs here against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from common import DEVICE, check_grads, float64_backend, measure, relative_error, synchronised, timed_backends

from aelearn.ops import log_qz


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    dim: int
    estimator: str
    groups: tuple[tuple[int, ...], ...] | None
    rounds: int

    def inputs(self, dtype=torch.float64):
        """Codes of a trained-looking encoder: mu ~ N(0, 1), logvar ~ U(−3, 1), z = mu + σ·ε."""
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(self.batch, self.dim, generator=g)
        logvar = torch.rand(self.batch, self.dim, generator=g) * 4 - 3
        z = mu + torch.exp(0.5 * logvar) * torch.randn(self.batch, self.dim, generator=g)
        return [t.to(DEVICE, dtype) for t in (z, mu, logvar)]

    def kwargs(self):
        return dict(dataset_size=100 * self.batch, estimator=self.estimator, groups=self.groups)

    @property
    def reference_bytes(self) -> int:
        """The reference holds about four B×B×D float32 tensors (densities, group sums, autograd)."""
        return 4 * 4 * self.batch * self.batch * self.dim


CPU_CASES = [
    Case("B2048-D32-mws", 2048, 32, "mws", None, rounds=3),
    Case("B2048-D32-mss", 2048, 32, "mss", None, rounds=3),
    Case("B2048-D32-mss-4groups", 2048, 32, "mss", tuple(tuple(range(g, 32, 4)) for g in range(4)), rounds=3),
    Case("B16384-D64-mss", 16_384, 64, "mss", None, rounds=1),
]
GPU_CASES = CPU_CASES[:3] + [Case("B65536-D64-mss", 65_536, 64, "mss", None, rounds=3)]
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES
_TRUTH: dict[str, tuple] = {}


def _scalar(joint: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """One number exercising both outputs: Σ log q(z) − Σ log q(z_G), i.e. B × the total correlation."""
    return joint.sum() - groups.sum()


def _float64_truth(case: Case, inputs):
    if case.name not in _TRUTH:
        leaves = [t.detach().double().requires_grad_(True) for t in inputs]
        joint, groups = log_qz(*leaves, **case.kwargs(), backend=float64_backend(case.reference_bytes))
        grads = torch.autograd.grad(_scalar(joint, groups), leaves)
        _TRUTH[case.name] = (torch.cat([joint.detach(), groups.detach().reshape(-1)]), grads)
    return _TRUTH[case.name]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", timed_backends("log_qz"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_log_qz(benchmark, case: Case, backend: str, mode: str):
    if backend == "reference" and float64_backend(case.reference_bytes) != "reference":
        pytest.skip(f"the reference would need about {case.reference_bytes / 2**30:.0f} GiB")
    if mode == "fwd" and case.rounds == 1:
        pytest.skip("the largest case is timed forward + backward only")
    truth_inputs = case.inputs()
    inputs = [t.float().requires_grad_(mode == "fwd+bwd") for t in truth_inputs]

    @synchronised
    def run():
        joint, groups = log_qz(*inputs, **case.kwargs(), backend=backend)
        if mode == "fwd+bwd":
            _scalar(joint, groups).backward()
        return torch.cat([joint.detach(), groups.detach().reshape(-1)])

    truth, truth_grads = _float64_truth(case, truth_inputs)
    value_error = relative_error(run(), truth)
    if mode == "fwd+bwd":
        check_grads(backend, [t.grad for t in inputs], truth_grads)
    for t in inputs:
        t.grad = None
    measure(benchmark, run, op="log_qz", case=case.name, mode=mode, backend=backend, rounds=case.rounds,
            value_error=value_error, n=case.batch, d=case.dim)
