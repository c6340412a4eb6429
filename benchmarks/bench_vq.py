"""Vector quantisation benchmarks: the nearest-codebook search of every backend against torch.cdist,
FAISS and (on a GPU) one cuBLAS GEMM of the same size; one training step of the VectorQuantizer
layer against vector-quantize-pytorch's VectorQuantize. Yardsticks that are not installed are skipped.

Every search is first checked against a float64 search of the same inputs: our backends must return
the float64 argmin (up to 1e-6-relative near-ties, the issue's definition); the yardsticks' wrong rows
are recorded, not asserted (torch.cdist and FAISS expand ‖z‖² + ‖e‖² − 2 z·e in float32).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from common import DEVICE, synchronised, timed_backends
from peak_memory import peak_extra_bytes

from aelearn.layers import VectorQuantizer
from aelearn.ops import vq_nearest

# The definition of a correct row: the float64 argmin, or a code within 1e-6 of its distance.
NEAR_TIE_RTOL = 1e-6


@dataclass(frozen=True)
class Case:
    name: str
    rows: int
    codes: int
    dim: int
    rounds: int
    yardsticks: tuple[str, ...]

    def inputs(self):
        """Encoder outputs around a codebook: z = codes + noise, like a trained quantiser's input."""
        g = torch.Generator().manual_seed(0)
        codebook = torch.randn(self.codes, self.dim, generator=g)
        z = torch.empty(self.rows, self.dim)
        for start in range(0, self.rows, 2**18):
            part = z[start : start + 2**18]
            picks = torch.randint(self.codes, (len(part),), generator=g)
            part.copy_(codebook[picks] + 0.5 * torch.randn(part.shape, generator=g))
        return z.to(DEVICE), codebook.to(DEVICE)


def cdist_search(z, codebook):
    distances, indices = torch.cdist(z, codebook).min(1)
    return indices, distances.square()


def faiss_search(z, codebook):
    import faiss

    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.numpy())
    sqdist, indices = index.search(z.numpy(), 1)
    return torch.from_numpy(indices[:, 0]), torch.from_numpy(sqdist[:, 0])


def gemm_only(z, codebook):
    """One cuBLAS GEMM of the search's size (z·Eᵀ, IEEE float32): the floor a fused search is compared with."""
    products = z @ codebook.T
    return products[:, 0].long(), products[:, 0]


YARDSTICKS: dict[str, tuple[Callable, str | None]] = {
    "torch.cdist": (cdist_search, None),
    "faiss": (faiss_search, "faiss"),
    "cublas_gemm": (gemm_only, None),
}

CPU_CASES = [
    Case("N65536-K8192-D64", 65_536, 8192, 64, rounds=3, yardsticks=("torch.cdist", "faiss")),
    Case("N1048576-K8192-D64", 1_048_576, 8192, 64, rounds=1, yardsticks=()),
]
GPU_CASES = [
    Case("N65536-K8192-D64", 65_536, 8192, 64, rounds=5, yardsticks=("torch.cdist",)),
    Case("N262144-K8192-D64", 262_144, 8192, 64, rounds=5, yardsticks=("cublas_gemm", "torch.cdist")),
]
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES

_TRUTH: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def float64_truth(case: Case, z, codebook):
    """The float64 nearest codes of a case (the fused float64 search, itself tested against the reference)."""
    if case.name not in _TRUTH:
        _TRUTH[case.name] = vq_nearest(z.double(), codebook.double())
    return _TRUTH[case.name]


def wrong_rows(indices, z, codebook, best_sqdist) -> int:
    """Rows whose chosen code is farther than the float64 best by more than the near-tie tolerance."""
    z64, codes64 = z.double(), codebook.double()
    chosen = torch.cat([(zc - codes64[ic.to(z.device)]).pow(2).sum(1) for zc, ic in zip(z64.split(2**16), indices.split(2**16))])
    return int((chosen.cpu() - best_sqdist.cpu() > NEAR_TIE_RTOL * best_sqdist.cpu()).sum())


def time_search(benchmark, case: Case, name: str, search: Callable, yardstick: bool) -> None:
    z, codebook = case.inputs()
    if yardstick and name == "torch.cdist" and 4.0 * case.rows * case.codes > 2**34:
        pytest.skip("torch.cdist would materialise more than 16 GiB")
    _, best = float64_truth(case, z, codebook)
    run = synchronised(lambda: search(z, codebook))
    indices, sqdist = run()
    wrong = wrong_rows(indices, z, codebook, best) if name != "cublas_gemm" else None
    if not yardstick:
        assert wrong == 0, f"{name}: {wrong} rows are not the float64 nearest code"
    error = None if wrong is None else float(((sqdist.double().cpu() - best.cpu()).abs() / best.cpu().clamp_min(1e-30)).max())
    peak = peak_extra_bytes(run, DEVICE)
    benchmark.group = f"vq_nearest {case.name} search"
    benchmark.extra_info.update(
        op="vq_nearest", case=case.name, mode="search", backend=name, device=DEVICE, peak_extra_bytes=peak,
        relative_error=error, wrong_rows=wrong, yardstick=yardstick, threads=torch.get_num_threads(), n=case.rows,
        k=case.codes, d=case.dim,
    )
    benchmark.pedantic(run, rounds=case.rounds, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("backend", timed_backends("vq_nearest"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vq_search(benchmark, case: Case, backend: str):
    if backend == "reference" and case.rows * case.codes > 2**26:
        pytest.skip("the float64 reference takes a minute and more at this size (44 s at N = 65,536, K = 8192)")
    time_search(benchmark, case, backend, lambda z, e: vq_nearest(z, e, backend=backend), yardstick=False)


@pytest.mark.parametrize("yardstick", sorted({y for c in CASES for y in c.yardsticks}))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vq_search_yardstick(benchmark, case: Case, yardstick: str):
    if yardstick not in case.yardsticks:
        pytest.skip(f"{yardstick} is not a yardstick of {case.name}")
    search, module = YARDSTICKS[yardstick]
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install {module}-cpu)")
    time_search(benchmark, case, yardstick, search, yardstick=True)


# One training step of a quantiser at the size: search, straight-through, commitment loss
# and its backward, EMA update (and, for ours, the dead-code check).
STEP_ROWS, STEP_CODES, STEP_DIM = 65_536, 1024, 64


def step_inputs():
    return Case("step", STEP_ROWS, STEP_CODES, STEP_DIM, 3, ()).inputs()[0].requires_grad_(True)


def record_step(benchmark, name: str, run: Callable, yardstick: bool) -> None:
    run = synchronised(run)
    run()
    peak = peak_extra_bytes(run, DEVICE)
    benchmark.group = f"vq_layer N{STEP_ROWS}-K{STEP_CODES}-D{STEP_DIM} training step"
    benchmark.extra_info.update(
        op="vq_layer", case="step", mode="step", backend=name, device=DEVICE, peak_extra_bytes=peak,
        relative_error=None, yardstick=yardstick, threads=torch.get_num_threads(), n=STEP_ROWS,
    )
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("backend", timed_backends("vq_nearest"))
def test_vq_layer_step(benchmark, backend: str):
    if backend == "reference":
        pytest.skip("the float64 reference search takes half a minute per step at this size")
    z = step_inputs()
    layer = VectorQuantizer(STEP_CODES, STEP_DIM, commitment=0.25, ema_decay=0.99, backend=backend).to(DEVICE)
    layer(z.detach())  # k-means initialisation, outside the timing

    def step():
        out = layer(z)
        (out.loss + out.quantized.sum()).backward()
        z.grad = None

    record_step(benchmark, f"aelearn {backend}", step, yardstick=False)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_vq_layer_step_yardstick(benchmark, mode: str):
    if importlib.util.find_spec("vector_quantize_pytorch") is None:
        pytest.skip("vector-quantize-pytorch is not installed (pip install vector-quantize-pytorch)")
    from vector_quantize_pytorch import VectorQuantize

    z = step_inputs()[None]
    layer = VectorQuantize(dim=STEP_DIM, codebook_size=STEP_CODES, decay=0.99, commitment_weight=0.25).to(DEVICE).train()

    def step():
        quantized, _, loss = layer(z)
        if mode == "fwd+bwd":
            (loss.sum() + quantized.sum()).backward()
            z.grad = None

    record_step(benchmark, f"vector-quantize-pytorch {mode}", step, yardstick=True)
