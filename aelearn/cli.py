"""The ``aelearn`` command. ``aelearn info``: versions, build flags and which backends can run."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

import aelearn
from aelearn import _ext


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aelearn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build flags and available backends")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
