"""The configuration of a training run: fields, validation, files and command-line overrides.

A configuration file is TOML (standard library), YAML (PyYAML, optional) or JSON, with the fields
of :class:`TrainConfig` at the top level and the model's and data's own options in tables::

    model = "beta_vae"
    data = "dsprites"
    run_dir = "runs/beta-vae-dsprites"
    steps = 300000
    lr = 1e-4
    lr_schedule = {kind = "cosine", start = 1.0, end = 0.1}

    [model_options]
    latent_dim = 10
    beta = 4.0

Overrides ``"key=value"`` take the value as TOML (``lr=3e-4``, ``amp="off"``, ``lr_schedule={kind="cosine"}``;
a bare word is a string) and reach into the option tables with dots (``model_options.beta=8``).
An unknown key, or a value of the wrong type, raises ValueError naming the key and the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aelearn.schedules import build_schedule

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "off", "bfloat16", "float16")
TENSORBOARD_MODES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Fields (the model's and the data's own options are checked by :func:`aelearn.models.build_model`
    and :func:`aelearn.data.build_dataset`):

    * ``model``, ``model_options``; ``data``, ``data_options``.
    * ``run_dir``: where checkpoints, logs and images go; an existing run is never overwritten,
      only continued with ``resume = true``.
    * ``steps``: optimiser steps; ``batch_size``: the global batch (split over the processes).
    * ``optimizer`` (adam, adamw, sgd, rmsprop), ``lr``, ``optimizer_options`` (passed to the torch
      optimiser: betas, weight_decay, momentum, eps...), ``group_options`` (per optimiser group of a
      multi-optimiser model, e.g. ``{discriminator = {lr = 1e-4, betas = [0.5, 0.9]}}``).
    * ``lr_schedule``: a schedule spec (:func:`aelearn.schedules.build_schedule`) multiplying every
      learning rate, spanning ``steps`` unless it says otherwise; ``warmup_steps``: a linear ramp
      from 0 multiplied on top.
    * ``grad_clip``: the largest global gradient norm per optimiser group (0: no clipping).
    * ``seed``; ``device`` (auto, cpu, cuda); ``amp``: mixed precision (auto: bfloat16 on CUDA
      devices that have it, else float16 with loss scaling, nothing on the CPU; off; or a dtype).
    * ``checkpoint_every`` steps (0: only at the end), ``keep_checkpoints`` (0: all);
      ``log_every`` steps (CSV, TensorBoard: auto/on/off, progress bar); ``image_every`` steps
      (0: never) a PNG grid of ``image_count`` reconstructions and samples.
    * ``num_workers`` of the data loader; ``labelled_examples``: keep the labels of only this many
      examples (the others get -1: semi-supervised training; -1 keeps every label).
    * ``eval_examples``: how many examples :func:`aelearn.train.evaluate` averages over.
    """

    model: str = "beta_vae"
    model_options: dict = field(default_factory=dict)
    data: str = "dsprites"
    data_options: dict = field(default_factory=dict)
    run_dir: str = "runs/run"
    resume: bool = False
    steps: int = 10_000
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-4
    optimizer_options: dict = field(default_factory=dict)
    group_options: dict = field(default_factory=dict)
    lr_schedule: Any = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    image_every: int = 1000
    image_count: int = 32
    num_workers: int = 0
    labelled_examples: int = -1
    eval_examples: int = 2048
    progress: bool = True
    tensorboard: str = "auto"

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a dict of fields; unknown keys raise ValueError naming the valid ones."""
        if not isinstance(values, dict):
            raise ValueError(f"a configuration must be a table of fields, got {type(values).__name__}")
        for key in values:
            _check_key(key)
        return cls(**values)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        for key in changes:
            _check_key(key)
        return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# What may differ between a run and its resumption: how long, how often and how it is watched.
# (A schedule whose span defaults to ``steps`` stretches with it from the resumed step on.)
RESUMABLE_CHANGES = frozenset(
    {"resume", "steps", "device", "checkpoint_every", "keep_checkpoints", "log_every", "image_every", "image_count",
     "num_workers", "eval_examples", "progress", "tensorboard"}
)


def _check_key(key) -> None:
    if key not in FIELDS:
        raise ValueError(f"unknown configuration key {key!r}; valid keys: {', '.join(FIELDS)}")


def _expect(key: str, value, kind: type | tuple[type, ...], description: str):
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"configuration key {key!r} must be {description}, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"configuration key {key!r} must be {description}, got {value!r} ({type(value).__name__})")
    return value


def _at_least(key: str, value, minimum: int) -> None:
    _expect(key, value, int, f"an int ≥ {minimum}")
    if value < minimum:
        raise ValueError(f"configuration key {key!r} must be an int ≥ {minimum}, got {value!r}")


def _choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"configuration key {key!r} must be one of {', '.join(choices)}; got {value!r}")


def validate(config: TrainConfig) -> None:
    """Check every field's type and range, converting ints given for floats; ValueError names the key."""
    for key in ("model", "data", "run_dir"):
        _expect(key, getattr(config, key), str, "a string")
        if not getattr(config, key):
            raise ValueError(f"configuration key {key!r} must not be empty")
    for key in ("model_options", "data_options", "optimizer_options", "group_options"):
        table = _expect(key, getattr(config, key), dict, "a table")
        if not all(isinstance(name, str) for name in table):
            raise ValueError(f"configuration key {key!r} must have string keys, got {list(table)!r}")
    for group, options in config.group_options.items():
        _expect(f"group_options.{group}", options, dict, "a table of optimiser options")
    for key in ("resume", "progress"):
        _expect(key, getattr(config, key), bool, "true or false")
    for key in ("steps", "batch_size"):
        _at_least(key, getattr(config, key), 1)
    for key in ("warmup_steps", "seed", "checkpoint_every", "keep_checkpoints", "log_every", "image_every", "num_workers", "eval_examples"):
        _at_least(key, getattr(config, key), 0)
    _at_least("image_count", config.image_count, 1)
    _at_least("labelled_examples", config.labelled_examples, -1)
    for key in ("lr", "grad_clip"):
        value = _expect(key, getattr(config, key), (int, float), "a number")
        if not value >= 0:
            raise ValueError(f"configuration key {key!r} must be ≥ 0, got {value!r}")
        setattr(config, key, float(value))
    if config.log_every == 0:
        raise ValueError("configuration key 'log_every' must be an int ≥ 1, got 0")
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("device", config.device, DEVICES)
    _choice("amp", config.amp, AMP_MODES)
    _choice("tensorboard", config.tensorboard, TENSORBOARD_MODES)
    build_schedule(config.lr_schedule, name="lr_schedule", default_steps=config.steps)


def _parse_value(text: str):
    """A TOML value (number, bool, string, array, inline table), or the text itself as a bare word."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: TrainConfig, overrides) -> TrainConfig:
    """``config`` with ``"key=value"`` overrides applied, validated; dotted keys reach into tables."""
    values = config.to_dict()
    for override in overrides:
        if not isinstance(override, str) or "=" not in override:
            raise ValueError(f"an override must read 'key=value', got {override!r}")
        path, text = (part.strip() for part in override.split("=", 1))
        head, *rest = path.split(".")
        _check_key(head)
        if not rest:
            values[head] = _parse_value(text)
            continue
        table = values[head]
        if not isinstance(table, dict):
            raise ValueError(f"configuration key {head!r} is not a table: {path!r} cannot be set")
        for part in rest[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ValueError(f"{path!r}: {part!r} is not a table")
        table[rest[-1]] = _parse_value(text)
    return TrainConfig.from_dict(values)


def read_config_file(path: str | os.PathLike) -> dict:
    """The table of fields in a .toml, .yaml/.yml or .json file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        with open(path, "rb") as file:
            return tomllib.load(file)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ImportError(f"reading the YAML file {path} needs PyYAML: pip install pyyaml (or use TOML)") from error
        with open(path) as file:
            return yaml.safe_load(file) or {}
    if suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"unknown configuration file type {path.name!r}; use .toml, .yaml, .yml or .json")


def load_config(path: str | os.PathLike | None = None, overrides=()) -> TrainConfig:
    """The config of a file (or the defaults when ``path`` is None) with overrides applied."""
    config = TrainConfig.from_dict(read_config_file(path)) if path is not None else TrainConfig()
    return apply_overrides(config, overrides)


def resume_conflicts(stored: TrainConfig, requested: TrainConfig) -> list[str]:
    """The fields that define the run and differ between a run's stored config and a resumption's."""
    return [key for key in FIELDS if key not in RESUMABLE_CHANGES and getattr(stored, key) != getattr(requested, key)]
