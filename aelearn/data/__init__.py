"""Data: procedural dSprites with ground-truth factors, small real images, the user's own images.

Items are ``(image [C, H, W] float32 in [0, 1], factors [F] int64)`` for :class:`FactorDataset`
subclasses and ``(image, label)`` (label a 0-d int64 tensor, −1 when unknown) for the others; both
fetch a DataLoader batch in one call (``__getitems__``). :func:`build_dataset` makes one by name
with keyword options, as the ``aelearn`` command and the training configuration do.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch.utils.data import Dataset

from aelearn.data.dsprites import ColorDSprites, CorrelatedDSprites, DSprites, color_palette
from aelearn.data.factors import FactorDataset
from aelearn.data.images import NO_LABEL, Digits, IDXImages, ImageFolder, TensorImages, read_idx

DATASETS: dict[str, Callable[..., Dataset]] = {
    "dsprites": DSprites,
    "color_dsprites": ColorDSprites,
    "correlated_dsprites": CorrelatedDSprites,
    "digits": Digits,
    "tensors": TensorImages,
    "image_folder": ImageFolder,
    "idx": IDXImages,
}


def build_dataset(name: str, **options) -> Dataset:
    """The dataset ``DATASETS[name](**options)``; ValueError naming the choices for an unknown name,
    an unknown option or a missing required one."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    parameters = inspect.signature(DATASETS[name]).parameters
    accepted = ", ".join(parameters) or "no options"
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown option(s) {', '.join(unknown)}; it accepts {accepted}")
    missing = [p for p, spec in parameters.items() if spec.default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ValueError(f"dataset {name!r}: missing option(s) {', '.join(missing)}; it accepts {accepted}")
    return DATASETS[name](**options)


__all__ = [
    "DATASETS",
    "NO_LABEL",
    "ColorDSprites",
    "CorrelatedDSprites",
    "DSprites",
    "Digits",
    "FactorDataset",
    "IDXImages",
    "ImageFolder",
    "TensorImages",
    "build_dataset",
    "color_palette",
    "read_idx",
]
