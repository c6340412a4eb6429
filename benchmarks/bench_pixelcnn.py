"""PixelCNN decoding: the incremental step per backend (pytest-benchmark), cached against naive
sampling, and a few minutes of training (a script).

    pytest benchmarks/bench_pixelcnn.py --benchmark-json=F    # the step op: every backend vs the torch reference
    python benchmarks/bench_pixelcnn.py sample                # cached (each backend) vs naive decoding
    python benchmarks/bench_pixelcnn.py train                 # train on 32×32 dSprites: bits/dim, sample grid
    python benchmarks/bench_pixelcnn.py all

Naive decoding runs the whole network once per channel of every pixel, at a cost that does not
depend on the step; a full naive decode of the cases below takes tens of minutes on a CPU, so it is
timed over ``--naive-steps`` steps and its total extrapolated (per-step median × H·W·C). Cached
decoding is timed whole. Both run in this process, one after the other, on the same model, batch
and generator seed. Results go to ``--out`` (default bench-results/pixelcnn) as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from common import DEVICE, bench_op, timed_backends

from aelearn.models.pixelcnn import PixelCNN
from aelearn.ops import _registry


@dataclass(frozen=True)
class Case:
    name: str
    image_shape: tuple[int, int, int]
    batch: int
    channels: int
    output: str
    levels: int | None = None
    num_layers: int = 12

    def model(self) -> PixelCNN:
        torch.manual_seed(0)
        model = PixelCNN(self.image_shape, num_layers=self.num_layers, channels=self.channels, output=self.output, levels=self.levels)
        return model.to(DEVICE).eval()


CPU_CASES = [
    Case("28x28-binary-b16", (1, 28, 28), 16, 64, "binary"),
    Case("32x32x3-256way-b4", (3, 32, 32), 4, 96, "categorical", 256),
]
GPU_CASES = [Case(f"28x28-binary-b{n}", (1, 28, 28), n, 64, "binary") for n in (1, 16, 256)] + CPU_CASES[1:]
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES


def step_case_inputs(case: Case):
    """The step's inputs at a mid-image column of the case's model, as float64 tensors."""
    model = case.model().double()
    weights = model.step_weights()
    g = torch.Generator().manual_seed(1)
    n, width, channels = case.batch, case.image_shape[2], case.channels
    x_row = torch.randn(n, width, weights.w_in.shape[1], generator=g, dtype=torch.float64)
    h_row = torch.randn(case.num_layers, n, width, channels, generator=g, dtype=torch.float64)
    v_row = torch.randn(case.num_layers, n, width, 2 * channels, generator=g, dtype=torch.float64)
    return [t.detach().to(DEVICE) for t in (x_row, h_row, v_row, *weights)], width // 2


@pytest.mark.parametrize("backend", timed_backends("pixelcnn_step"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pixelcnn_step(benchmark, case: Case, backend: str):
    inputs, col = step_case_inputs(case)

    def step(x_row, h_row, v_row, *weights, backend):
        """The step as cached decoding calls it: the backend's kernel, inputs validated once per decode
        (through the public pixelcnn_step every call also pays ~0.15 ms of validation)."""
        impl = _registry.select("pixelcnn_step", x_row.device, x_row.dtype, x_row, h_row, v_row, col, *weights, backend=backend)
        logits, h_col = impl.forward(x_row, h_row, v_row, col, *weights)
        return torch.cat([logits.flatten(), h_col.flatten()])

    bench_op(benchmark, step, inputs, op="pixelcnn_step", case=case.name, mode="fwd", backend=backend, rounds=200,
             reference_bytes=0, n=case.batch)


# ---- the script: decoding and training ----


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_cached(model: PixelCNN, batch: int, backend: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        generator = torch.Generator(DEVICE).manual_seed(0)
        synchronize()
        start = time.perf_counter()
        model.sample(batch, generator=generator, backend=backend)
        synchronize()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def time_naive_steps(model: PixelCNN, batch: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` naive steps: the whole network on the image so far, then one draw."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    levels = torch.zeros(batch, *model.image_shape, dtype=torch.int64, device=DEVICE)
    channels, _, width = model.image_shape
    times = []
    for step in range(steps):
        pixel, c = divmod(step, channels)
        i, j = divmod(pixel, width)
        synchronize()
        start = time.perf_counter()
        logits = model(levels)[:, c, ..., i, j]
        levels[:, c, i, j] = model._draw(logits, torch.rand(batch, generator=generator, dtype=torch.float64, device=DEVICE))
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def run_sample(args) -> list[dict]:
    rows = []
    for case in CASES:
        model = case.model()
        total_steps = math.prod(case.image_shape)
        naive = time_naive_steps(model, case.batch, args.naive_steps)
        naive_total = statistics.median(naive[1:]) * total_steps
        for backend in _registry.available("pixelcnn_step", DEVICE):
            if backend == "triton" and DEVICE == "cpu":
                continue
            time_cached(model, case.batch, backend, 1) if DEVICE == "cuda" else None
            times = time_cached(model, case.batch, backend, args.rounds)
            cached = statistics.median(times)
            rows.append(dict(case=case.name, backend=backend, device=DEVICE, threads=torch.get_num_threads(),
                             cached_s=cached, cached_runs_s=times, naive_step_s=statistics.median(naive[1:]),
                             naive_steps_timed=len(naive) - 1, naive_total_estimate_s=naive_total,
                             speedup=naive_total / cached))
            print(f"{case.name}: cached {backend} {cached:.2f} s, naive ≈ {naive_total:.0f} s "
                  f"({statistics.median(naive[1:]) * 1e3:.1f} ms/step × {total_steps}) → {naive_total / cached:.0f}×", flush=True)
    return rows


def dsprites_32(count: int, generator: torch.Generator) -> torch.Tensor:
    """Binary dSprites images subsampled to 32×32 (every other pixel: still exactly 0 or 1)."""
    from aelearn.data import DSprites

    images, _ = DSprites().sample(count, generator=generator)
    return images[:, :, ::2, ::2].contiguous()


def run_train(args) -> dict:
    from aelearn.train.images import image_grid, write_png

    generator = torch.Generator().manual_seed(0)
    train_images, test_images = dsprites_32(20_000, generator), dsprites_32(1_000, generator)
    torch.manual_seed(0)
    model = PixelCNN((1, 32, 32), num_layers=args.train_layers, channels=args.train_channels)
    with torch.no_grad():
        before = model.bits_per_dim(test_images).item()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    start, steps, curve = time.perf_counter(), 0, []
    while time.perf_counter() - start < args.train_seconds:
        batch = train_images[torch.randint(len(train_images), (args.train_batch,), generator=generator)]
        loss = model.loss(batch, step=steps)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
        if steps % 25 == 0:
            curve.append((steps, loss.item()))
            print(f"step {steps}: {loss.item():.4f} bits/dim", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        after = model.bits_per_dim(test_images).item()
    samples = model.sample(64, generator=torch.Generator().manual_seed(1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_png(out / "samples.png", image_grid(model.images_from_levels(samples), columns=8))
    write_png(out / "data.png", image_grid(test_images[:64], columns=8))
    result = dict(steps=steps, seconds=seconds, batch=args.train_batch, layers=args.train_layers, channels=args.train_channels,
                  test_bits_per_dim_untrained=before, test_bits_per_dim_trained=after, curve=curve)
    print(f"trained {steps} steps in {seconds:.0f} s: test bits/dim {before:.4f} untrained → {after:.4f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sample", "train", "all"])
    parser.add_argument("--out", default="bench-results/pixelcnn")
    parser.add_argument("--rounds", type=int, default=3, help="timed cached decodes per backend")
    parser.add_argument("--naive-steps", type=int, default=12, help="naive steps timed (the first is warm-up)")
    parser.add_argument("--train-seconds", type=float, default=240.0)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-layers", type=int, default=6)
    parser.add_argument("--train-channels", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.what in ("sample", "all"):
        results["sample"] = run_sample(args)
    if args.what in ("train", "all"):
        results["train"] = run_train(args)
    (out / f"{args.what}.json").write_text(json.dumps(results, indent=2))
    lines = ["| case | backend | cached (s) | naive, extrapolated (s) | speed-up |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['backend']} | {r['cached_s']:.2f} | {r['naive_total_estimate_s']:.0f} | {r['speedup']:.0f}× |" for r in results.get("sample", [])]
    if "train" in results:
        t = results["train"]
        lines += ["", f"Training: {t['steps']} steps ({t['seconds']:.0f} s, batch {t['batch']}, {t['layers']} layers × {t['channels']} channels): "
                  f"test bits/dim {t['test_bits_per_dim_untrained']:.4f} untrained → {t['test_bits_per_dim_trained']:.4f}; samples in samples.png"]
    (out / f"{args.what}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
