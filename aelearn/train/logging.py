"""Where the metrics of a run go: ``metrics.csv`` in the run directory, and TensorBoard if installed.

The CSV has one row per logged step and one column per metric, in order of first appearance;
a metric appearing later (a model that logs a term from some step on) rewrites the header, with
empty cells in the rows before. A resumed run first drops the rows logged after its checkpoint,
so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np


def _tensorboard_writer(log_dir: Path, mode: str):
    """A SummaryWriter, or None when ``mode`` is "off", or "auto" without TensorBoard installed."""
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if mode == "auto":
            return None
        raise ImportError("tensorboard = \"on\" needs TensorBoard: pip install tensorboard (or set tensorboard = \"off\")") from error
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLog:
    """Rows of metrics appended to ``<run_dir>/metrics.csv`` (and TensorBoard scalars and images)."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: str = "auto", resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        if self.path.exists():
            with open(self.path, newline="") as file:
                reader = csv.DictReader(file)
                self.columns = list(reader.fieldnames or [])
                self.rows = [row for row in reader if resume_step is None or int(row["step"]) <= resume_step]
            self._rewrite()
        self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard", tensorboard)

    def _rewrite(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append the row of ``step``."""
        row = {"step": str(step), **{name: repr(float(value)) for name, value in metrics.items()}}
        self.rows.append(row)
        new = [name for name in row if name not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as file:
                csv.DictWriter(file, fieldnames=self.columns).writerow(row)
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """Send an image grid ``[H, W, C]`` uint8 to TensorBoard (the PNG files are written apart)."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[float]]:
    """The columns of a run's ``metrics.csv`` as lists of floats (NaN for empty cells)."""
    with open(Path(run_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    columns = rows[0].keys() if rows else []
    return {name: [float(row[name]) if row[name] else float("nan") for row in rows] for name in columns}
