"""log q(z) (β-TCVAE, MWS / MSS) benchmarks: every backend that runs here against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from common import DEVICE, bench_op, timed_backends

from aelearn.ops import log_qz


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    dim: int
    estimator: str
    groups: tuple[tuple[int, ...], ...] | None
    rounds: int

    def inputs(self):
        """Codes of a trained-looking encoder: mu ~ N(0, 1), logvar ~ U(−3, 1), z = mu + σ·ε."""
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(self.batch, self.dim, generator=g, dtype=torch.float64)
        logvar = torch.rand(self.batch, self.dim, generator=g, dtype=torch.float64) * 4 - 3
        z = mu + torch.exp(0.5 * logvar) * torch.randn(self.batch, self.dim, generator=g, dtype=torch.float64)
        return [t.to(DEVICE) for t in (z, mu, logvar)]

    def op(self, z, mu, logvar, backend):
        """Both outputs as one vector [log q(z_i); −log q(z_i,G)]: its sum is B × the total correlation."""
        joint, groups = log_qz(z, mu, logvar, dataset_size=100 * self.batch, estimator=self.estimator, groups=self.groups, backend=backend)
        return torch.cat([joint, -groups.reshape(-1)])

    @property
    def reference_bytes(self) -> int:
        """The reference holds about four B×B×D float32 tensors (densities, group sums, autograd)."""
        return 4 * 4 * self.batch * self.batch * self.dim


FOUR_GROUPS = tuple(tuple(range(g, 32, 4)) for g in range(4))
CPU_CASES = [
    Case("B2048-D32-mws", 2048, 32, "mws", None, rounds=3),
    Case("B2048-D32-mss", 2048, 32, "mss", None, rounds=3),
    Case("B2048-D32-mss-4groups", 2048, 32, "mss", FOUR_GROUPS, rounds=3),
    Case("B16384-D64-mss", 16_384, 64, "mss", None, rounds=1),
]
GPU_CASES = CPU_CASES[:3] + [Case("B65536-D64-mss", 65_536, 64, "mss", None, rounds=3)]
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", timed_backends("log_qz"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_log_qz(benchmark, case: Case, backend: str, mode: str):
    bench_op(benchmark, case.op, case.inputs(), op="log_qz", case=case.name, mode=mode, backend=backend,
             rounds=case.rounds, reference_bytes=case.reference_bytes, n=case.batch, d=case.dim)
