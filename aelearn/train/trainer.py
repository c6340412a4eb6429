"""The trainer: one loop for every family of models, from a :class:`~aelearn.train.config.TrainConfig`.

Per step: the learning rates of the step's schedule; the model's losses in one forward pass (under
autocast when mixed precision is on); each optimiser group's loss back-propagated into that group's
parameters only (:mod:`aelearn.models.base`); gradients averaged over the replicas; per group,
clipping and the optimiser's step, in the order the model declares its groups.

Exact resumption: the model, the optimisers, the loss scaler, the global random generators of every
replica, the logging accumulators and the step are checkpointed; the data order is a function of
the seed and the step (:class:`~aelearn.train.data.GlobalBatchSampler`); image grids draw from
their own generators inside ``fork_rng``. On the CPU a run stopped and resumed is bit-for-bit the
run that never stopped.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from aelearn.models import build_model
from aelearn.models.base import MAIN_GROUP, loss_key, trainable_parameters
from aelearn.schedules import build_schedule
from aelearn.train import distributed
from aelearn.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_temporaries,
    save_checkpoint,
)
from aelearn.train.config import TrainConfig, resume_conflicts
from aelearn.train.data import GlobalBatchSampler, PartiallyLabelled, make_loader
from aelearn.train.images import image_grid, write_png
from aelearn.train.logging import MetricsLog
from aelearn.train.rng import capture_rng_state, derive_seed, restore_rng_state, seed_everything

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
CONFIG_FILE = "config.json"


def resolve_device(name: str) -> torch.device:
    """The device of this process: CUDA (the local rank's under torchrun) when asked or available."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = \"cuda\" but torch sees no CUDA device")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", distributed.current().local_rank)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: full precision)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[mode]


def observation_shape(dataset: Dataset) -> tuple[int, int, int]:
    """(C, H, W) of a dataset's images: its ``observation_shape``, else its first item's shape."""
    shape = getattr(dataset, "observation_shape", None)
    if shape is None:
        item = dataset[0]
        shape = (item[0] if isinstance(item, (tuple, list)) else item).shape
    return tuple(int(s) for s in shape)


def build_training_dataset(config: TrainConfig) -> Dataset:
    from aelearn.data import build_dataset

    return build_dataset(config.data, **config.data_options)


def optimizer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's optimiser groups (one "main" group by default), checked to partition its
    trainable parameters."""
    groups = model.optimizer_groups() if hasattr(model, "optimizer_groups") else {MAIN_GROUP: trainable_parameters(model)}
    if MAIN_GROUP not in groups:
        raise ValueError(f"optimizer_groups() must contain a {MAIN_GROUP!r} group, got {list(groups)}")
    seen: dict[int, str] = {}
    for name, parameters in groups.items():
        if not parameters:
            raise ValueError(f"optimiser group {name!r} has no parameters")
        for parameter in parameters:
            if id(parameter) in seen:
                raise ValueError(f"a parameter is in optimiser groups {seen[id(parameter)]!r} and {name!r}")
            seen[id(parameter)] = name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters in no optimiser group: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return groups


def make_optimizer(kind: str, parameters: list[nn.Parameter], lr: float, options: dict, *, group: str) -> torch.optim.Optimizer:
    """The torch optimiser of ``kind`` with ``options``; a bad option raises ValueError naming it."""
    cls = OPTIMIZERS[kind]
    valid = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "params", "lr")]
    for key in options:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} of optimiser {kind!r} (group {group!r}); valid options: {', '.join(valid)}")
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    if "fused" in valid and "fused" not in options and "foreach" not in options:
        # One kernel over all parameters instead of one per tensor, on the CPU and on CUDA alike.
        options["fused"] = True
    try:
        return cls(parameters, lr=lr, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"optimiser {kind!r} of group {group!r}: {error}") from error


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(item, device) for item in batch)
    return batch


class Trainer:
    """Builds (or takes) the dataset and the model of ``config`` and trains them: :meth:`fit`.

    ``model`` and ``dataset`` replace the ones the config names (for models and data that no
    registry holds); a dataset's items are an image ``[C, H, W]`` or ``(image, label_or_factors)``.
    Under ``torchrun`` the process group must be started first (:func:`train` does it).
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None, dataset: Dataset | None = None):
        self.config = config
        self.replicas = distributed.current()
        self.device = resolve_device(config.device)
        self.run_dir = Path(config.run_dir)
        checkpoint = self._prepare_run_dir()

        # The dataset and the model are built from the same random state on every replica.
        seed_everything(derive_seed(config.seed, "init"))
        dataset = build_training_dataset(config) if dataset is None else dataset
        if config.labelled_examples >= 0:
            dataset = PartiallyLabelled(dataset, config.labelled_examples, seed=config.seed)
        self.dataset = dataset
        if model is None:
            model = build_model(config.model, observation_shape(dataset), **config.model_options)
        if not callable(getattr(model, "loss", None)):
            raise TypeError(f"the model ({type(model).__name__}) has no loss(batch, *, step) method")
        self.model = model.to(self.device)
        if self.replicas.distributed:
            distributed.broadcast_module(self.model)
        self.groups = optimizer_groups(self.model)
        unknown = [name for name in config.group_options if name not in self.groups]
        if unknown:
            raise ValueError(f"group_options names groups the model does not have: {unknown}; its groups: {list(self.groups)}")
        self.base_lr: dict[str, float] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for name, parameters in self.groups.items():
            options = {**config.optimizer_options, **config.group_options.get(name, {})}
            self.base_lr[name] = float(options.pop("lr", config.lr))
            self.optimizers[name] = make_optimizer(config.optimizer, parameters, self.base_lr[name], options, group=name)

        self.amp_dtype = resolve_amp(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.lr_schedule = build_schedule(config.lr_schedule, name="lr_schedule", default_steps=config.steps)

        self.step = 0
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_count = 0
        self._fixed_images: torch.Tensor | None = None
        if checkpoint is not None:
            self._restore(load_checkpoint(checkpoint, map_location="cpu"))
        else:
            seed_everything(derive_seed(config.seed, "train", self.replicas.rank))
        if self.replicas.is_main:
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))

    def _prepare_run_dir(self) -> Path | None:
        """Refuse to overwrite a run; the checkpoint to resume from, if resuming."""
        config = self.config
        checkpoint = None
        if config.resume:
            checkpoint = latest_checkpoint(self.run_dir)
            if checkpoint is None:
                raise FileNotFoundError(
                    f"resume = true but {self.run_dir} holds no checkpoint to resume from (a run stopped before its "
                    "first checkpoint: delete the directory to start it afresh)"
                )
            stored = TrainConfig.from_dict(json.loads((self.run_dir / CONFIG_FILE).read_text()))
            conflicts = resume_conflicts(stored, config)
            if conflicts:
                raise ValueError(
                    f"cannot resume {self.run_dir} with a different {', '.join(conflicts)}; only "
                    "steps, device, logging, image, checkpoint and worker settings may change"
                )
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise FileExistsError(f"{self.run_dir} already holds a run: choose another run_dir, or set resume = true to continue it")
        # Every replica checks before any creates the directory.
        if self.replicas.distributed:
            distributed.barrier()
        if self.replicas.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.run_dir)
        if self.replicas.distributed:
            distributed.barrier()
        return checkpoint

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self._log_sums = dict(state["log"]["sums"])
        self._log_count = state["log"]["count"]
        if len(state["rng"]) == self.replicas.world_size:
            restore_rng_state(state["rng"][self.replicas.rank])
        else:
            warnings.warn(
                f"the checkpoint was written by {len(state['rng'])} processes and is resumed by {self.replicas.world_size}: "
                "the random streams are re-seeded, so the run continues, but not as the original would have",
                stacklevel=3,
            )
            seed_everything(derive_seed(self.config.seed, "train", self.replicas.rank, self.step))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def lr_factor(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.config.warmup_steps) if self.config.warmup_steps else 1.0
        return warmup * self.lr_schedule(step)

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the float16 loss scale (as it is without loss scaling)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One optimiser step of every group on ``batch`` (already on the device); the loss terms."""
        factor = self.lr_factor(self.step)
        for name, optimizer in self.optimizers.items():
            for param_group in optimizer.param_groups:
                param_group["lr"] = self.base_lr[name] * factor
        with self._autocast():
            terms = self.model.loss(batch, step=self.step)
        missing = [loss_key(name) for name in self.groups if loss_key(name) not in terms]
        if missing:
            raise KeyError(f"the model's loss() returned {sorted(terms)}; the trainer needs {missing} (one per optimiser group)")
        if len(self.groups) == 1:
            self._scaled(terms["loss"]).backward()
        else:
            # Each group's loss reaches its own parameters only; the graph is kept for the next group.
            last = len(self.groups) - 1
            for index, (name, parameters) in enumerate(self.groups.items()):
                self._scaled(terms[loss_key(name)]).backward(inputs=parameters, retain_graph=index < last)
        if self.replicas.distributed:
            distributed.average_gradients([p for parameters in self.groups.values() for p in parameters], self.replicas.world_size)
        logged = {key: value.detach() for key, value in terms.items()}
        for name, optimizer in self.optimizers.items():
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            if self.config.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.groups[name], self.config.grad_clip)
                logged["grad_norm" if name == MAIN_GROUP else f"grad_norm/{name}"] = norm.detach()
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return logged

    def _accumulate(self, logged: dict[str, torch.Tensor]) -> None:
        for key, value in logged.items():
            value = value.float()
            self._log_sums[key] = self._log_sums[key] + value if key in self._log_sums else value.clone()
        self._log_count += 1

    def _reduce_logs(self) -> dict[str, float]:
        """The means since the last log, over steps and replicas; resets the accumulators."""
        names = list(self._log_sums)
        totals = torch.stack([self._log_sums[name].to(self.device) for name in names]) / self._log_count
        if self.replicas.distributed:
            totals = distributed.all_reduce_sum(totals) / self.replicas.world_size
        self._log_sums, self._log_count = {}, 0
        return dict(zip(names, totals.tolist()))

    def _image_batch(self) -> torch.Tensor:
        count = min(self.config.image_count, len(self.dataset))
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "image-examples"))
        indices = torch.randperm(len(self.dataset), generator=generator)[:count].tolist()
        items = [self.dataset[i] for i in indices]
        images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
        return images.to(self.device)

    @torch.no_grad()
    def write_images(self, log: MetricsLog) -> None:
        """PNG grids of reconstructions (each row of examples above its reconstructions) and of
        samples from fixed codes, in ``<run_dir>/images``; models without reconstruct/sample have none."""
        if not (hasattr(self.model, "reconstruct") and hasattr(self.model, "sample")):
            return
        if self._fixed_images is None:
            self._fixed_images = self._image_batch()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.model.eval()
            try:
                with self._autocast():
                    reconstructions = self.model.reconstruct(self._fixed_images)
                    generator = torch.Generator(self.device).manual_seed(derive_seed(self.config.seed, "image-samples"))
                    samples = self.model.sample(len(self._fixed_images), generator=generator)
            finally:
                self.model.train()
        columns = 8

        def full_row(images: torch.Tensor) -> torch.Tensor:
            # A short last row is filled with white images, the grid's background.
            return torch.cat([images.float(), images.new_ones((columns - len(images), *images.shape[1:]))])

        pairs = [
            full_row(rows[start : start + columns])
            for start in range(0, len(self._fixed_images), columns)
            for rows in (self._fixed_images, reconstructions)
        ]
        directory = self.run_dir / "images"
        directory.mkdir(exist_ok=True)
        for tag, images in (("reconstructions", torch.cat(pairs)), ("samples", samples.float())):
            grid = image_grid(images, columns=columns)
            write_png(directory / f"step-{self.step:08d}-{tag}.png", grid)
            log.image(tag, grid, self.step)

    def save(self) -> Path:
        """Checkpoint the run at the current step (a collective call under torch.distributed)."""
        rng = capture_rng_state()
        rngs = distributed.gather_objects(rng) if self.replicas.distributed else [rng]
        path = checkpoint_path(self.run_dir, self.step)
        if self.replicas.is_main:
            state = {
                "step": self.step,
                "world_size": self.replicas.world_size,
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": rngs,
                "log": {"sums": self._log_sums, "count": self._log_count},
            }
            save_checkpoint(state, path)
            prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        return path

    def fit(self, until: int | None = None) -> Path:
        """Train to ``config.steps`` (or stop early at step ``until``, checkpointed, to resume
        later); the run directory."""
        config, replicas = self.config, self.replicas
        end = config.steps if until is None else min(until, config.steps)
        sampler = GlobalBatchSampler(
            len(self.dataset), config.batch_size, seed=config.seed, rank=replicas.rank, world_size=replicas.world_size, start=self.step
        )
        loader = make_loader(self.dataset, sampler, num_workers=config.num_workers, pin_memory=self.device.type == "cuda", seed=config.seed)
        log = MetricsLog(self.run_dir, tensorboard=config.tensorboard, resume_step=self.step) if replicas.is_main else None
        bar = tqdm(total=config.steps, initial=self.step, unit="step", dynamic_ncols=True, disable=not (config.progress and replicas.is_main))
        batches = iter(loader)
        saved_at = self.step
        started = window_start = time.perf_counter()
        window_steps = 0
        try:
            while self.step < end:
                self._accumulate(self.train_step(_to_device(next(batches), self.device)))
                window_steps += 1
                bar.update(1)
                if self.step % config.log_every == 0:
                    means = self._reduce_logs()
                    now = time.perf_counter()
                    rates = {"steps_per_s": window_steps / (now - window_start), "time_s": now - started}
                    window_start, window_steps = now, 0
                    lr = self.base_lr[MAIN_GROUP] * self.lr_factor(self.step - 1)
                    if log is not None:
                        log.log(self.step, {"epoch": self.step / sampler.batches_per_epoch, "lr": lr, **means, **rates})
                        bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
                    self._check_finite(means)
                if log is not None and config.image_every and self.step % config.image_every == 0:
                    self.write_images(log)
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save()
                    saved_at = self.step
            if saved_at != self.step:
                self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        return self.run_dir

    def _check_finite(self, means: dict[str, float]) -> None:
        bad = [key for key, value in means.items() if key.startswith("loss") and not math.isfinite(value)]
        if bad:
            last = latest_checkpoint(self.run_dir)
            raise FloatingPointError(
                f"step {self.step}: non-finite {', '.join(bad)}; the last checkpoint is {last} "
                "(try a lower lr, grad_clip, or amp = \"off\")"
            )


def train(config: TrainConfig | dict, *, model: nn.Module | None = None, dataset: Dataset | None = None) -> Path:
    """Train the run ``config`` describes (a :class:`TrainConfig` or a dict of its fields); the run
    directory. Under ``torchrun`` it joins the process group (gloo on the CPU, NCCL on GPUs) first."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    created = distributed.start(resolve_device(config.device).type)
    try:
        return Trainer(config, model=model, dataset=dataset).fit()
    finally:
        if created:
            distributed.stop()
