"""The ``aelearn`` command: train and evaluate models, time the backends, describe the installation.

    aelearn train --model beta_vae --data dsprites --steps 2000 --out runs/demo
    aelearn train --config run.toml lr=3e-4 model_options.beta=8
    aelearn eval runs/demo
    aelearn bench
    aelearn info

A mistake a user can make (an unknown model, dataset or configuration key, a run directory that
already holds a run, a missing or corrupted checkpoint) ends with one line on stderr and exit
status 2; ``--traceback`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path

import torch

import aelearn
from aelearn import _ext

# Errors that describe a user's mistake: one line, no traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
               FloatingPointError, aelearn.BackendUnavailableError)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    """What ``aelearn info`` prints."""
    lines = [
        f"aelearn {aelearn.__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; CUDA device: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'})",
        f"numba {_version('numba')}, triton {_version('triton')}",
        "",
        "extension aelearn._C:",
    ]
    for key, value in _ext.build_info().items():
        lines.append(f"  {key}: {value}")
    lines += ["", "backends:"]
    for op, table in aelearn.backends().items():
        for name, reason in table.items():
            lines.append(f"  {op:<10} {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# aelearn train / eval
# ---------------------------------------------------------------------------------------------


def training_config(args: argparse.Namespace):
    """The run's config: the file (or the defaults), then the flags, then the ``key=value`` overrides."""
    from aelearn.train import load_config

    flags = {"model": args.model, "data": args.data, "steps": args.steps, "run_dir": args.out,
             "batch_size": args.batch_size, "seed": args.seed, "device": args.device}
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if args.resume:
        overrides.append("resume=true")
    return load_config(args.config, [*overrides, *args.overrides])


def command_train(args: argparse.Namespace) -> int:
    from aelearn.train import train

    config = training_config(args)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    run_dir = train(config)
    print(f"run written to {run_dir} (evaluate it with: aelearn eval {run_dir})")
    return 0


def metric_names(text: str) -> list[str]:
    """``--metrics``: a comma-separated list of metric names, or "none"."""
    if text.strip().lower() == "none":
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


def printed_numbers(results: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of eval.json to print: the loss terms at the top level, then each section's
    scores with dotted keys (the protocol, timings and per-latent lists stay in the file)."""
    numbers: dict[str, float] = {}
    for key, value in results.items():
        if key in ("protocol", "seconds", "latents"):
            continue
        if isinstance(value, dict):
            numbers.update(printed_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[prefix + key] = float(value)
    return numbers


def command_eval(args: argparse.Namespace) -> int:
    from aelearn.metrics.report import RESULTS_FILE, write_report

    run_dir = Path(args.run_dir)
    report = write_report(
        run_dir, metrics=args.metrics, num_train=args.num_train, examples=args.examples,
        aggregate_examples=args.aggregate_examples, likelihood_samples=args.iwae_samples, entropy=args.entropy,
        device=args.device,
    )
    numbers = printed_numbers(json.loads((run_dir / RESULTS_FILE).read_text()))
    width = max(len(key) for key in numbers)
    for key, value in numbers.items():
        print(f"{key:<{width}}  {value:.6g}")
    print(f"written: {report}, {run_dir / RESULTS_FILE}")
    return 0


# ---------------------------------------------------------------------------------------------
# aelearn bench: a quick in-process comparison (the full harness is `make bench`)
# ---------------------------------------------------------------------------------------------


def bench_cases(device: str) -> dict:
    """One moderate case per op: a function of the backend name returning a tensor to compare."""
    from aelearn.ops import log_qz, mmd, vq_nearest
    from aelearn.ops import hsic

    g = torch.Generator().manual_seed(0)

    def normal(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, y = normal(2048, 16), normal(2048, 16) + 0.1
    z, mu, logvar = normal(1024, 32), normal(1024, 32), normal(1024, 32).clamp(-3, 1)
    codes = normal(1024, 64)
    rows = codes[torch.randint(1024, (16384,), generator=g).to(device)] + 0.3 * normal(16384, 64)
    return {
        "mmd n=2048 d=16": lambda backend: mmd(x, y, bandwidths=[1.0, 4.0], backend=backend).reshape(1),
        "hsic n=2048 p=q=16": lambda backend: hsic(x, y, bandwidth_x=2.0, bandwidth_y=2.0, backend=backend).reshape(1),
        "log_qz B=1024 D=32": lambda backend: log_qz(z, mu, logvar, dataset_size=100_000, backend=backend)[1],
        "vq_nearest N=16384 K=1024 D=64": lambda backend: vq_nearest(rows, codes, backend=backend)[1],
    }


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def command_bench(args: argparse.Namespace) -> int:
    from aelearn.ops import _registry

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cases = bench_cases(device)
    unknown = [name for name in args.only if not any(name in case for case in cases)]
    if unknown:
        raise ValueError(f"--only {unknown[0]!r} matches no case; cases: {'; '.join(cases)}")
    print(f"best of {args.repeats} runs per backend, {device}, {torch.get_num_threads()} threads "
          "(the full harness with memory and accuracy checks: make bench)")
    for case, fn in cases.items():
        if args.only and not any(name in case for name in args.only):
            continue
        op = case.split()[0]
        reference = fn("reference")
        reference_time = best_time(lambda: fn("reference"), args.repeats)
        print(f"\n{case}\n  {'reference':<10} {reference_time * 1e3:9.1f} ms")
        for backend in _registry.available(op, device):
            if backend == "reference" or (backend == "triton" and device == "cpu"):
                continue
            value = fn(backend)
            error = float((value.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-30))
            seconds = best_time(lambda: fn(backend), args.repeats)
            print(f"  {backend:<10} {seconds * 1e3:9.1f} ms  {reference_time / seconds:6.1f}× the reference  "
                  f"(max relative difference {error:.1e})")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def training_fields_help() -> str:
    """Every configuration field with its default, and the meaning of each (TrainConfig's docstring)."""
    from aelearn.data import DATASETS
    from aelearn.models import MODELS
    from aelearn.train import TrainConfig

    names = f"models: {', '.join(sorted(MODELS))}\ndatasets: {', '.join(sorted(DATASETS))}\n\n"
    defaults = "\n".join(f"  {name} = {json.dumps(value)}" for name, value in TrainConfig().to_dict().items())
    doc = TrainConfig.__doc__.split("\n\n", 1)[1]
    notes = "\n".join(line[4:] if line.startswith("    ") else line for line in doc.splitlines())
    return f"{names}configuration fields and their defaults:\n{defaults}\n\nmeaning:\n{notes.rstrip()}"


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="aelearn", description="Train and evaluate autoencoder models, time the backends, describe the installation.",
        epilog="Each command has its own --help.", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    main_parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    commands = main_parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a model (a new run, or --resume one)",
        description="Train a model. The configuration is the file given by --config (TOML, YAML or JSON; the "
        "defaults without one), then the flags below, then any KEY=VALUE overrides. Every field of the "
        "configuration can be overridden that way: values are TOML (lr=3e-4, amp=\"off\", "
        "lr_schedule={kind=\"cosine\"}; a bare word is a string), dotted keys reach into the option tables "
        "(model_options.beta=8, data_options.n_colors=4); the fields are listed below. "
        "A run directory that already holds a run is never overwritten: pass --resume to continue it.",
    )
    train.epilog = training_fields_help()
    train.formatter_class = argparse.RawDescriptionHelpFormatter
    train.add_argument("--config", type=Path, help="configuration file (.toml, .yaml, .yml or .json)")
    train.add_argument("--model", help="model name (listed below)")
    train.add_argument("--data", help="dataset name (listed below)")
    train.add_argument("--steps", type=int, help="number of optimiser steps")
    train.add_argument("--batch-size", type=int, help="global batch size (split over the processes under torchrun)")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (auto: cuda when available)")
    train.add_argument("--out", help="run directory: checkpoints, metrics.csv, images, config.json")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--dry-run", action="store_true", help="print the resulting configuration and stop")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    train.set_defaults(run=command_train)

    evaluation = commands.add_parser(
        "eval", help="evaluate a trained run: report, pictures, metrics",
        description="Evaluate a run's last checkpoint and write RUN_DIR/report.md (Markdown: loss terms, rate and "
        "distortion, the latents with their traversals, reconstructions and samples, disentanglement metrics, "
        "the ELBO decomposition, the IWAE log-likelihood, the protocol), its pictures in RUN_DIR/eval/ and every "
        "number in RUN_DIR/eval.json. A section the model or the data does not allow is skipped, and the report "
        "says why. The defaults are the published protocols, which take minutes on a CPU for dSprites; the "
        "options below shrink them.",
    )
    evaluation.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'aelearn train'")
    evaluation.add_argument("--metrics", type=metric_names, metavar="NAMES",
                            help="comma-separated disentanglement metrics (beta_vae, factor_vae, mig, dci, sap, modularity, "
                            "unsupervised), or none (default: all of them for data with ground-truth factors, else unsupervised)")
    evaluation.add_argument("--num-train", type=int, metavar="N",
                            help="training points of each metric, held-out sets scaled as published "
                            "(default: 10000, the published protocol)")
    evaluation.add_argument("--examples", type=int, metavar="N",
                            help="examples for the loss terms, rate, distortion, pictures and decomposition codes "
                            "(default: the run's eval_examples)")
    evaluation.add_argument("--aggregate-examples", type=int, metavar="N",
                            help="examples whose posteriors form the aggregate q(z) of the ELBO decomposition "
                            "(default: the whole dataset; 0: no decomposition)")
    evaluation.add_argument("--iwae-samples", type=int, default=100, metavar="K",
                            help="importance samples per example of the log-likelihood (default: 100; 0: none)")
    evaluation.add_argument("--entropy", action=argparse.BooleanOptionalAction, default=True,
                            help="compute the data entropy H of a factor dataset for the D = H − R line "
                            "(renders every image once)")
    evaluation.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device")
    evaluation.set_defaults(run=command_eval)

    bench = commands.add_parser(
        "bench", help="time every available backend against the reference",
        description="Time every available backend of every op on one moderate case against the reference, "
        "in this process. The full benchmark harness (sizes of the issues, memory, yardsticks) is 'make bench'.",
    )
    bench.add_argument("--only", nargs="*", default=[], metavar="OP", help="only the cases whose name contains OP")
    bench.add_argument("--repeats", type=int, default=3, help="runs per backend; the best is reported")
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device")
    bench.set_defaults(run=command_bench)

    info = commands.add_parser("info", help="versions, build flags and available backends")
    info.set_defaults(run=lambda args: print(info_text()) or 0)
    return main_parser


def main(argv: list[str] | None = None) -> int:
    main_parser = parser()
    # Overrides may come anywhere on the line (argparse takes positionals only before the options).
    args, extra = main_parser.parse_known_args(argv)
    if extra:
        if args.command != "train" or any(item.startswith("-") or "=" not in item for item in extra):
            main_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        print(f"aelearn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aelearn {args.command}: interrupted (a run keeps its last checkpoint: resume it with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
