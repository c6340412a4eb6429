"""The model zoo: models the trainer drives (:mod:`aelearn.models.base`), shared networks and likelihoods.

``build_model(name, observation_shape, **options)`` builds a model of :data:`MODELS` from the
options of a configuration file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from aelearn.models.base import GenerativeModel, Model, loss_key, split_batch
from aelearn.models.likelihoods import LIKELIHOODS, Bernoulli, Gaussian
from aelearn.models.networks import ARCHITECTURES, build_networks
from aelearn.models.vae import VAE, BetaVAE, gaussian_kl
from aelearn.models.pixelcnn import PixelCNN
from aelearn.models.vib import VIB

MODELS: dict[str, Callable[..., nn.Module]] = {"vae": VAE, "beta_vae": BetaVAE, "pixelcnn": PixelCNN, "vib": VIB}


def _options_of(factory: Callable) -> list[str]:
    """The keyword options a model takes, following ``**options`` up to its base classes."""
    names: list[str] = []
    for cls in inspect.getmro(factory) if inspect.isclass(factory) else ():
        if "__init__" not in vars(cls) or cls in (Model, GenerativeModel, nn.Module):
            continue
        parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def build_model(name: str, observation_shape: Sequence[int], **options) -> nn.Module:
    """The model ``MODELS[name](observation_shape, **options)``; an unknown name or option raises
    ValueError naming the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    valid = _options_of(MODELS[name])
    for key in options:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} of model {name!r}; valid options: {', '.join(valid)}")
    return MODELS[name](tuple(observation_shape), **options)


__all__ = [
    "ARCHITECTURES",
    "Bernoulli",
    "BetaVAE",
    "Gaussian",
    "GenerativeModel",
    "LIKELIHOODS",
    "MODELS",
    "Model",
    "PixelCNN",
    "VAE",
    "VIB",
    "build_model",
    "build_networks",
    "gaussian_kl",
    "loss_key",
    "split_batch",
]
