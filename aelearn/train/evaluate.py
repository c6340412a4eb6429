"""Evaluation of a trained run: its model's loss terms averaged over held examples.

The datasets of ground-truth factors have no test split (they are the whole product space), so
by default the loss terms are averaged over ``eval_examples`` examples drawn without replacement
by a seed of their own; pass a held-out dataset to measure generalisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from aelearn.models import build_model
from aelearn.train.checkpoint import latest_checkpoint, load_checkpoint
from aelearn.train.config import TrainConfig
from aelearn.train.rng import derive_seed
from aelearn.train.trainer import CONFIG_FILE, build_training_dataset, observation_shape, resolve_device


def load_run(run_dir: str | os.PathLike, *, model: nn.Module | None = None, dataset: Dataset | None = None, device: str = "auto"):
    """``(config, model, dataset, step)`` of a run: its config, its model (built from the config
    unless given) holding the last checkpoint's weights, in eval mode, and its training dataset."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    config = TrainConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint")
    target = resolve_device(device)
    state = load_checkpoint(checkpoint, map_location=target)
    dataset = build_training_dataset(config) if dataset is None else dataset
    if model is None:
        model = build_model(config.model, observation_shape(dataset), **config.model_options)
    model.load_state_dict(state["model"])
    return config, model.to(target).eval(), dataset, state["step"]


@torch.no_grad()
def evaluate(
    run_dir: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    dataset: Dataset | None = None,
    examples: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """The mean of every loss term of the run's last checkpoint over ``examples`` examples (the
    config's ``eval_examples`` by default) of ``dataset`` (the training data by default), with
    ``"step"`` and ``"examples"``. The model's own noise (e.g. a VAE's sampled codes) is drawn from
    a fixed seed, so the numbers are repeatable."""
    config, model, dataset, step = load_run(run_dir, model=model, dataset=dataset, device=device)
    count = min(config.eval_examples if examples is None else examples, len(dataset))
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "eval-examples"))
    subset = Subset(dataset, torch.randperm(len(dataset), generator=generator)[:count].tolist())
    target = next(model.parameters()).device
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[target.index or 0] if target.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, "eval-noise"))
        for batch in DataLoader(subset, batch_size=batch_size or config.batch_size):
            size = len(batch if isinstance(batch, torch.Tensor) else batch[0])
            batch = batch.to(target) if isinstance(batch, torch.Tensor) else [part.to(target) for part in batch]
            for key, value in model.loss(batch, step=step).items():
                sums[key] = sums.get(key, 0.0) + float(value) * size
    return {"step": float(step), "examples": float(count), **{key: total / count for key, total in sums.items()}}
