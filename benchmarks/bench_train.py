"""Training speed of β-VAE with the 64×64 convolutional architecture at batch 64, through the trainer.

    python benchmarks/bench_train.py speed      # steps/s: in-memory dSprites images, and rendered on the fly
    python benchmarks/bench_train.py curve      # a 2,000-step run on dSprites: loss curve (CSV, PNG)
    python benchmarks/bench_train.py replicas   # 2 processes (torchrun, gloo) vs 1, same global batch
    python benchmarks/bench_train.py all

Steps per second come from the trainer's own log (``steps_per_s`` per logging window of
``LOG_EVERY`` steps), the first window left out as warm-up; the median window is reported with
the range. Every configuration runs in a fresh process with its own thread count. Results go to
``--out`` (default bench-results/train) as JSON, Markdown and the loss curve's PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from aelearn.data import DSprites
from aelearn.train import TrainConfig, read_metrics, train

BATCH = 64
LOG_EVERY = 10
MEMORY_EXAMPLES = 4096


def memory_dsprites() -> TensorDataset:
    """dSprites images rendered once and held in memory: the data costs nothing per step."""
    images, factors = DSprites().sample(MEMORY_EXAMPLES, generator=torch.Generator().manual_seed(0))
    return TensorDataset(images, factors)


def run_config(run_dir: str, steps: int, num_workers: int = 0) -> TrainConfig:
    return TrainConfig(
        model="beta_vae", model_options={"latent_dim": 10, "beta": 4.0}, data="dsprites", run_dir=run_dir,
        steps=steps, batch_size=BATCH, lr=1e-4, log_every=LOG_EVERY, checkpoint_every=0, image_every=0,
        num_workers=num_workers, progress=False, tensorboard="off",
    )


def window_rates(run_dir: str) -> list[float]:
    return read_metrics(run_dir)["steps_per_s"][1:]


def run_here(args) -> None:
    """One training run in this process (under torchrun: one replica)."""
    torch.set_num_threads(args.threads)
    dataset = memory_dsprites() if args.data == "memory" else None
    train(run_config(args.run_dir, args.steps, args.workers), dataset=dataset)


def launch(steps: int, threads: int, *, processes: int = 1, data: str = "memory", workers: int = 0) -> str:
    """Train one configuration in fresh processes; the run directory."""
    run_dir = tempfile.mkdtemp(prefix="bench-train-") + "/run"
    command = [__file__, "_run", "--steps", str(steps), "--threads", str(threads), "--data", data,
               "--workers", str(workers), "--run-dir", run_dir]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *command]
    else:
        command = [sys.executable, *command]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return run_dir


def measure(steps: int, threads: int, *, processes: int = 1, data: str = "memory", workers: int = 0) -> dict:
    """The steps/s of one configuration: median and range of its logging windows, and the
    machine's load average around it (other processes' load skews the comparison)."""
    load_before = os.getloadavg()[0]
    rates = window_rates(launch(steps, threads, processes=processes, data=data, workers=workers))
    return {"processes": processes, "threads": threads, "data": data, "workers": workers, "steps": steps,
            "median_steps_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "load_average": (load_before + os.getloadavg()[0]) / 2}


def describe(row: dict) -> str:
    return (f"| {row['processes']} × {row['threads']} thread(s) | {row['data']} (workers {row['workers']}) | "
            f"{row['median_steps_per_s']:.2f} | {row['min']:.2f} – {row['max']:.2f} | {row['load_average']:.1f} |")


TABLE_HEAD = ["| processes × threads | data | steps/s (median window) | range | load average |", "| --- | --- | --- | --- | --- |"]


def speed(args) -> list[str]:
    cores = os.cpu_count() or 1
    rows = [measure(args.steps, 1), measure(args.steps, cores)]
    rows.append(measure(args.steps, cores, data="dsprites"))
    rows.append(measure(args.steps, max(1, cores - 1), data="dsprites", workers=1))
    lines = ["## β-VAE conv64, batch 64: training steps per second", "", *TABLE_HEAD, *map(describe, rows)]
    _save(args.out, "speed", rows)
    return lines


def replicas(args) -> list[str]:
    """1 process × 1 thread, 1 process × all cores, 2 processes × 1 thread, interleaved over
    ``--rounds`` rounds so that a change of the machine's load hits every configuration alike."""
    cores = os.cpu_count() or 1
    setups = [dict(threads=1), dict(threads=cores), dict(threads=1, processes=2)]
    rows = [measure(args.steps, **setup) for _ in range(args.rounds) for setup in setups]
    rate = {index: statistics.median(r["median_steps_per_s"] for r in rows[index :: len(setups)]) for index in range(len(setups))}
    lines = [
        f"## Two processes (gloo, 1 thread each) vs one, global batch {BATCH}, {args.rounds} interleaved rounds", "",
        *TABLE_HEAD, *map(describe, rows), "",
        f"speed-up of 2 processes (medians over rounds): {rate[2] / rate[1]:.2f}× over 1 process × {cores} threads, "
        f"{rate[2] / rate[0]:.2f}× over 1 process × 1 thread",
    ]
    _save(args.out, "replicas", rows)
    return lines


def curve(args) -> list[str]:
    out = Path(args.out)
    # The main process trains on all cores but one; one loader worker renders the next batches.
    run_dir = launch(args.curve_steps, max(1, (os.cpu_count() or 1) - 1), data="dsprites", workers=1)
    metrics = read_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.csv").write_text((Path(run_dir) / "metrics.csv").read_text())
    first, last = metrics["loss"][:5], metrics["loss"][-5:]
    lines = [
        f"## Loss of a {args.curve_steps}-step run on dSprites (rendered on the fly, batch {BATCH})", "",
        f"mean loss over steps 1–{5 * LOG_EVERY}: {statistics.mean(first):.1f}; over the last {5 * LOG_EVERY} steps: "
        f"{statistics.mean(last):.1f} (reconstruction {statistics.mean(metrics['reconstruction'][-5:]):.1f}, "
        f"KL {statistics.mean(metrics['kl'][-5:]):.2f}); median {statistics.median(metrics['steps_per_s'][1:]):.2f} steps/s",
    ]
    png = _plot(metrics, out / "curve.png")
    if png is not None:
        lines.append(f"![loss curve]({png.name})")
    _save(args.out, "curve", [{"step": s, "loss": l} for s, l in zip(metrics["step"], metrics["loss"])])
    return lines


def _plot(metrics: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("loss", "reconstruction", "kl"):
        ax.plot(metrics["step"], metrics[name], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"β-VAE (β = 4) conv64 on dSprites, batch {BATCH}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(out: str, name: str, rows: list[dict]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(rows, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "curve", "replicas", "all", "_run"])
    parser.add_argument("--steps", type=int, default=60, help="steps per speed measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the replica comparison")
    parser.add_argument("--curve-steps", type=int, default=2000)
    parser.add_argument("--out", default="bench-results/train")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--data", default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.what == "_run":
        run_here(args)
        return
    lines: list[str] = []
    for part, function in (("speed", speed), ("replicas", replicas), ("curve", curve)):
        if args.what in (part, "all"):
            lines += [*function(args), ""]
    report = "\n".join(lines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.what}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
