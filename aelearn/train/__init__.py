"""Training: ``train(config) -> run_dir`` and ``evaluate(run_dir) -> dict``, what the ``aelearn`` command calls.

* :mod:`~aelearn.train.config`: :class:`TrainConfig`, :func:`load_config` (TOML / YAML / JSON and
  ``key=value`` overrides).
* :mod:`~aelearn.train.trainer`: :class:`Trainer` (optimiser groups, schedules, clipping, mixed
  precision, image grids, exact resumption, data-parallel replicas under ``torchrun``).
* :mod:`~aelearn.train.checkpoint`: atomic checkpoint files loaded with ``weights_only=True``.
* :mod:`~aelearn.train.data`: the resumable distributed batch sampler, partial labelling.
* :mod:`~aelearn.train.logging`: ``metrics.csv`` and TensorBoard.
"""

from aelearn.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from aelearn.train.config import TrainConfig, apply_overrides, load_config
from aelearn.train.data import GlobalBatchSampler, PartiallyLabelled
from aelearn.train.evaluate import evaluate, load_run
from aelearn.train.logging import read_metrics
from aelearn.train.trainer import Trainer, train

__all__ = [
    "CheckpointError",
    "GlobalBatchSampler",
    "PartiallyLabelled",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_run",
    "read_metrics",
    "save_checkpoint",
    "train",
]
