"""Rate and distortion of VAE-like models (Alemi et al. 2018, "Fixing a Broken ELBO"), and H(X).

For an encoder q(z|x) = N(μ(x), diag σ²(x)), the prior p(z) = N(0, I) and a decoder p(x|z):

    rate        R   = E_x KL(q(z|x) ‖ p(z))          (closed form per example)
    distortion  D   = E_x E_q(z|x) [−log p(x|z)]     (one z ~ q(z|x) per example)
    class distortion D_y = E_x E_q(z|x) [−log p(y|z)] (VIB models, Alemi et al. 2017)

in nats per example. For data of entropy H, every model satisfies H − R ≤ D (the rate–distortion
bound, with R + D the negative ELBO); :func:`data_entropy` gives H exactly for a dataset of
ground-truth factors. :func:`rate_distortion_sweep` evaluates, or trains then evaluates, one model
per β: the points of the β-VAE family on the R–D plane.

The helpers :func:`evaluating`, :func:`encoded_batches` and :func:`select_examples` are shared with
:mod:`aelearn.metrics.decomposition` and :mod:`aelearn.metrics.likelihood`: a ``dataset`` is an
image tensor ``[N, C, H, W]``, or a map-style dataset whose items are images or ``(image, label
or factors, ...)`` (a :class:`~aelearn.data.FactorDataset`, :class:`~aelearn.data.TensorImages`, a
``TensorDataset``...), read in batches through a DataLoader.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aelearn.data.factors import FactorDataset, check_count, check_generator
from aelearn.models.base import split_batch
from aelearn.models.vae import gaussian_kl


class RatePoint(NamedTuple):
    """One model on the rate–distortion plane, nats per example."""

    rate: float  # E KL(q(z|x) ‖ p(z))
    distortion: float  # E −log p(x|z)


class SupervisedRatePoint(NamedTuple):
    """One VIB model on the rate–class-distortion plane, nats per (labelled) example."""

    rate: float  # E KL(q(z|x) ‖ p(z))
    class_distortion: float  # E −log p(y|z)


# ---------------------------------------------------------------------------------------------
# Reading datasets and checking models (shared by the estimators of aelearn.metrics)
# ---------------------------------------------------------------------------------------------


def dataset_length(dataset) -> int:
    """The number of examples of an image tensor or a sized map-style dataset (> 0)."""
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 4:
            raise ValueError(f"dataset: an image tensor must be [N, C, H, W], got shape {tuple(dataset.shape)}")
        length = len(dataset)
    elif isinstance(dataset, Dataset) or hasattr(dataset, "__getitem__"):
        if not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must have a length, got {type(dataset).__name__}")
        length = len(dataset)
    else:
        raise TypeError(f"dataset must be an image tensor [N, C, H, W] or a map-style dataset, got {type(dataset).__name__}")
    if length == 0:
        raise ValueError("dataset is empty")
    return length


def check_batch_size(batch_size, name: str = "batch_size") -> int:
    """``batch_size`` as an int ≥ 1, or a ValueError/TypeError naming ``name``."""
    if check_count(batch_size, name) < 1:
        raise ValueError(f"{name} must be ≥ 1, got {batch_size}")
    return batch_size


def select_examples(length: int, num_examples: int | None, generator: torch.Generator | None) -> torch.Tensor | None:
    """Indices ``[num_examples]`` drawn without replacement (sorted, for sequential reads), or None for all."""
    check_generator(generator)
    if num_examples is None:
        return None
    check_count(num_examples, "num_examples")
    if not 1 <= num_examples <= length:
        raise ValueError(f"num_examples must lie in [1, {length}] (the dataset's size), got {num_examples}")
    if num_examples == length:
        return None
    return torch.randperm(length, generator=generator)[:num_examples].sort().values


def batches(dataset, batch_size: int, device: torch.device, indices: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(images [b, C, H, W], labels [b] / factors [b, F] or None)`` of ``dataset`` in order, on ``device``.

    ``indices``: the examples to read (all when None). A map-style dataset goes through a DataLoader
    (one ``__getitems__`` call per batch where the dataset has it).
    """
    if isinstance(dataset, torch.Tensor):
        order = torch.arange(len(dataset)) if indices is None else indices
        for start in range(0, len(order), batch_size):
            yield dataset[order[start : start + batch_size].to(dataset.device)].to(device), None
        return
    sampler = None if indices is None else indices.tolist()
    for batch in DataLoader(dataset, batch_size=batch_size, sampler=sampler):
        images, labels = split_batch(batch)
        if images.dim() != 4:
            raise ValueError(f"dataset: images must be [N, C, H, W], got a batch of shape {tuple(images.shape)}")
        yield images.to(device), (None if labels is None else labels.to(device))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a module with neither)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_model(model: nn.Module, *, decoder: bool = True) -> None:
    """A TypeError naming what ``model`` lacks: ``posterior(x) -> (mu, logvar)``, and with
    ``decoder`` also ``decoder(z)`` and ``likelihood.nll(output, x)``."""
    needs = ["posterior"] + (["decoder"] if decoder else [])
    missing = [name for name in needs if not callable(getattr(model, name, None))]
    if decoder and not callable(getattr(getattr(model, "likelihood", None), "nll", None)):
        missing.append("likelihood.nll")
    if missing:
        raise TypeError(
            "model must have a Gaussian encoder posterior(x) -> (mu, logvar)"
            + (", a decoder(z) and likelihood.nll(output, x)" if decoder else "")
            + f"; {type(model).__name__} lacks {', '.join(missing)}"
        )


def check_posterior(mu, logvar, batch: int) -> None:
    """A ValueError unless ``model.posterior`` gave two finite ``[batch, D]`` tensors."""
    if not (isinstance(mu, torch.Tensor) and isinstance(logvar, torch.Tensor)):
        raise TypeError("model.posterior(x) must return two tensors (mu, logvar)")
    if mu.dim() != 2 or mu.shape[0] != batch or mu.shape != logvar.shape:
        raise ValueError(
            f"model.posterior(x) must return (mu, logvar) of shape [{batch}, D] each, got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )
    if not (torch.isfinite(mu).all() and torch.isfinite(logvar).all()):
        raise ValueError("model.posterior(x) returned NaN or Inf")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside the block; the model's train/eval mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encoded_batches(model: nn.Module, dataset, batch_size: int, indices: torch.Tensor | None = None):
    """``(images, labels or None, mu, logvar)`` of each batch of :func:`batches` on the model's device,
    the posterior (μ, log σ²) ``[b, D]`` checked finite. Call it inside :func:`evaluating`."""
    for images, labels in batches(dataset, batch_size, model_device(model), indices):
        mu, logvar = model.posterior(images)
        check_posterior(mu, logvar, len(images))
        yield images, labels, mu, logvar


def sample_codes(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = μ + σ·ε, ε ~ N(0, I) drawn on the CPU from ``generator`` (same seed, same codes on any device)."""
    noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
    return mu + torch.exp(0.5 * logvar) * noise


# ---------------------------------------------------------------------------------------------
# Rate and distortion
# ---------------------------------------------------------------------------------------------


def _mean_terms(model, dataset, terms, *, num_examples, batch_size, generator) -> tuple[float, float, int]:
    """Float64 sums over the examples of ``terms(images, labels, mu, logvar, z) -> (rate [b], distortion [b], mask [b])``."""
    check_batch_size(batch_size)
    indices = select_examples(dataset_length(dataset), num_examples, generator)
    rate = distortion = 0.0
    count = 0
    with evaluating(model):
        for images, labels, mu, logvar in encoded_batches(model, dataset, batch_size, indices):
            kl, nll, keep = terms(images, labels, mu, logvar, sample_codes(mu, logvar, generator))
            rate += float(kl[keep].double().sum())
            distortion += float(nll.double().sum())
            count += int(keep.sum())
    return rate, distortion, count


def rate_distortion(
    model: nn.Module,
    dataset,
    *,
    num_examples: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> RatePoint:
    """Rate E KL(q(z|x) ‖ p(z)) and distortion E −log p(x|z) of ``model`` on ``dataset``, nats per example.

    ``model``: ``posterior(x) -> (mu, logvar)`` ``[N, D]``, ``decoder(z)`` and
    ``likelihood.nll(output, x) -> [N]`` (an :class:`aelearn.models.VAE`). ``num_examples``: a
    random subset of that size (all examples when None); ``generator`` draws it and the codes
    z ~ q(z|x), one per example. Evaluated in eval mode without gradients; sums in float64.
    """
    check_model(model)

    def terms(images, labels, mu, logvar, z):
        nll = model.likelihood.nll(model.decoder(z), images)
        return gaussian_kl(mu, logvar), nll, torch.ones(len(images), dtype=torch.bool, device=images.device)

    rate, distortion, count = _mean_terms(model, dataset, terms, num_examples=num_examples, batch_size=batch_size, generator=generator)
    return RatePoint(rate=rate / count, distortion=distortion / count)


def rate_distortion_supervised(
    model: nn.Module,
    dataset,
    *,
    num_examples: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> SupervisedRatePoint:
    """Rate E KL(q(z|x) ‖ p(z)) and class distortion E −log p(y|z) of a VIB model, nats per labelled example.

    ``model``: ``posterior(x)``, ``targets(labels) -> y [N]`` (−1: unlabelled, left out) and
    ``class_nll(z, y) -> [N]`` (an :class:`aelearn.models.vib.VIB`); ``dataset`` gives images with
    class labels or factors. Other arguments as :func:`rate_distortion`.
    """
    check_model(model, decoder=False)
    for name in ("targets", "class_nll"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model must be a VIB-style classifier with targets(labels) and class_nll(z, y); {type(model).__name__} lacks {name}")

    def terms(images, labels, mu, logvar, z):
        y = model.targets(labels)
        keep = y >= 0
        return gaussian_kl(mu, logvar), model.class_nll(z[keep], y[keep]), keep

    rate, distortion, count = _mean_terms(model, dataset, terms, num_examples=num_examples, batch_size=batch_size, generator=generator)
    if count == 0:
        raise ValueError("dataset has no labelled example (every label is -1)")
    return SupervisedRatePoint(rate=rate / count, class_distortion=distortion / count)


def rate_distortion_sweep(
    config_or_models,
    betas: Sequence[float] | None = None,
    *,
    dataset=None,
    supervised: bool = False,
    num_examples: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> list[RatePoint] | list[SupervisedRatePoint]:
    """One rate–distortion point per model of a β family, in order.

    ``config_or_models``: trained models (one, or a list or other iterable of them, evaluated on
    ``dataset``, required), or a training configuration (:class:`aelearn.train.TrainConfig` or a
    dict of its fields) trained once per β of ``betas`` through :func:`aelearn.train.train`, with ``model_options.beta = β`` and the run
    directory ``<run_dir>/beta-<β>``; each is evaluated on ``dataset``, by default its training data.
    ``supervised``: points of :func:`rate_distortion_supervised` (VIB models), else of
    :func:`rate_distortion`. The same ``generator`` state is used for every model, so the points
    differ by the models only. Other arguments as :func:`rate_distortion`.
    """
    evaluate = rate_distortion_supervised if supervised else rate_distortion
    state = None if generator is None else generator.get_state()

    def point(model, data):
        if state is not None:
            generator.set_state(state)
        return evaluate(model, data, num_examples=num_examples, batch_size=batch_size, generator=generator)

    from aelearn.train import TrainConfig, load_run, train

    if not isinstance(config_or_models, (dict, TrainConfig)):
        single = isinstance(config_or_models, nn.Module) and not isinstance(config_or_models, nn.ModuleList)
        models = list(config_or_models) if hasattr(config_or_models, "__iter__") and not single else [config_or_models]
        if not models or not all(isinstance(model, nn.Module) for model in models):
            raise TypeError(f"config_or_models must be trained models (nn.Module), a TrainConfig or a dict, got {config_or_models!r:.80}")
        if betas is not None:
            raise ValueError("betas applies to a training configuration; given models are evaluated as they are")
        if dataset is None:
            raise ValueError("dataset is required to evaluate given models")
        return [point(model, dataset) for model in models]
    config = TrainConfig.from_dict(config_or_models) if isinstance(config_or_models, dict) else config_or_models
    if not betas:
        raise ValueError("betas: give at least one β to train")
    points = []
    for beta in betas:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"betas must be numbers ≥ 0, got {beta!r}")
        run = config.replace(model_options={**config.model_options, "beta": float(beta)}, run_dir=f"{config.run_dir}/beta-{beta:g}")
        _, model, data, _ = load_run(train(run), device=run.device)
        points.append(point(model, data if dataset is None else dataset))
    return points


# ---------------------------------------------------------------------------------------------
# Entropy of the data
# ---------------------------------------------------------------------------------------------


def _image_digests(images: torch.Tensor) -> np.ndarray:
    """A 128-bit BLAKE2b digest of every image ``[n, ...]``, as an ``[n]`` array of 16-byte strings.

    Binary images are hashed as packed bits (1/32 of the bytes), others as their float32 bytes with
    −0.0 made 0.0; the two encodings differ in length, so equal images always get equal digests.
    """
    flat = images.detach().flatten(1).float().cpu() + 0.0
    binary = ((flat == 0) | (flat == 1)).all(1).numpy()
    packed = np.packbits(flat.numpy() == 1, axis=1)
    raw = flat.numpy()
    digests = [
        hashlib.blake2b((packed[i] if binary[i] else raw[i]).tobytes(), digest_size=16).digest() for i in range(len(flat))
    ]
    return np.array(digests, dtype="S16")


def data_entropy(dataset: FactorDataset, *, chunk_size: int = 4096) -> float:
    """H(X) in nats of the images of a factor dataset under the uniform distribution on its grid, exact.

    Every grid point is rendered once, in chunks of ``chunk_size``, and its image hashed (128-bit
    BLAKE2b: a collision among dSprites' 737,280 images has probability ~1e-27); images that several
    factor vectors share (dSprites' square every 90°, ellipse every 180°) count with their
    multiplicity m: H = log N − Σ_images (m/N) log m. Memory: one chunk of images and 16 bytes per
    grid point. ``sample_factors`` of the dataset (e.g. a correlated one) is not used: the entropy is
    that of the uniform grid.
    """
    if not isinstance(dataset, FactorDataset):
        raise TypeError(f"dataset must be a FactorDataset (images rendered from a factor grid), got {type(dataset).__name__}")
    check_batch_size(chunk_size, "chunk_size")
    length = len(dataset)
    digests = np.empty(length, dtype="S16")
    for start in range(0, length, chunk_size):
        index = torch.arange(start, min(start + chunk_size, length))
        digests[start : start + len(index)] = _image_digests(dataset.images_from_factors(dataset.index_to_factors(index)))
    _, counts = np.unique(digests, return_counts=True)
    multiplicities = counts.astype(np.float64)
    return math.log(length) - float((multiplicities * np.log(multiplicities)).sum()) / length
