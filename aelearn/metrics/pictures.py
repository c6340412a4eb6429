"""Pictures of a model: latent traversals, reconstructions and samples as PNG grids, and the
rate–distortion and metric plots.

Grids are written by :mod:`aelearn.train.images` (no imaging library needed). Plots need
matplotlib (``pip install aelearn[eval]``); each is drawn on a :class:`matplotlib.figure.Figure`
of its own, never through pyplot, so a user's global matplotlib state (current figure, backend)
is left as it was. Every function returns the path it wrote.

The models drawn are those of :mod:`aelearn.models`: ``encode(x) -> [N, D]`` (the posterior mean),
``decode(z) -> [N, C, H, W]`` images in [0, 1] (values outside are clipped), ``sample(n,
generator)``, and for KL-ordered traversals ``posterior(x) -> (mu, logvar)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from aelearn.metrics.rate_distortion import evaluating, model_device
from aelearn.train.images import image_grid, write_png

# Images encoded or decoded per forward pass: bounds the activations a picture needs.
BATCH_SIZE = 256
# The central mass of the posterior means a data-driven traversal ("span='data'") covers.
DATA_QUANTILES = (0.05, 0.95)
TRAVERSAL_ORDERS = ("kl", "variance", "index")
EVAL_EXTRA = "pip install aelearn[eval]"


def _check_images(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of images [N, C, H, W], got shape {tuple(x.shape)}")
    return x


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be ≥ 1, got {value}")
    return value


def _require(model: nn.Module, *methods: str, purpose: str) -> None:
    missing = [name for name in methods if not callable(getattr(model, name, None))]
    if missing:
        raise TypeError(f"{purpose} needs a model with {', '.join(m + '()' for m in missing)}; {type(model).__name__} has none")


def _in_batches(function, x: torch.Tensor, device: torch.device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``function`` applied to ``x`` in batches of :data:`BATCH_SIZE` on ``device``, outputs
    (a tensor or a tuple of tensors) concatenated on the CPU in float32."""
    parts = [function(x[start : start + BATCH_SIZE].to(device)) for start in range(0, len(x), BATCH_SIZE)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([part[i].float().cpu() for part in parts]) for i in range(len(parts[0])))
    return torch.cat([part.float().cpu() for part in parts])


def _check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return values


def kl_per_latent(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_d, σ_d²) ‖ N(0, 1)) of every latent of every row, ``[N, D]``: ½ (μ² + σ² − 1 − log σ²)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


def decreasing(scores: torch.Tensor) -> list[int]:
    """The indices of ``scores [D]`` by decreasing score, ties in index order (a stable sort)."""
    return torch.sort(-scores, stable=True).indices.tolist()


def latent_kl(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean KL(q(z_d | x) ‖ N(0, 1)) of each latent over the images ``x: [N, C, H, W]`` →
    ``[D]`` float64 nats: ½ E_x[μ_d² + σ_d² − 1 − log σ_d²]. Latents the model does not use have
    KL ≈ 0; the ones carrying information about x have the largest."""
    _require(model, "posterior", purpose="the KL of each latent")
    x = _check_images(x)
    with evaluating(model):
        mu, logvar = _in_batches(model.posterior, x, model_device(model))
    mu = _check_finite(mu.double(), "the posterior means")
    logvar = _check_finite(logvar.double(), "the posterior log-variances")
    return kl_per_latent(mu, logvar).mean(0)


def traversal_order(model: nn.Module, x: torch.Tensor, order: str = "kl") -> list[int]:
    """The latents in the order traversal rows show them: ``"kl"`` by decreasing mean KL over
    ``x`` (:func:`latent_kl`; the informative latents first, Higgins et al. 2017), ``"variance"``
    by decreasing variance of the codes ``encode(x)`` over ``x`` (models without a posterior),
    ``"index"`` as numbered. Ties keep the lower index first."""
    if order not in TRAVERSAL_ORDERS:
        raise ValueError(f"order must be one of {', '.join(TRAVERSAL_ORDERS)}, got {order!r}")
    if order == "kl":
        scores = latent_kl(model, x)
    else:
        _require(model, "encode", purpose="a latent traversal")
        with evaluating(model):
            codes = _check_finite(_in_batches(model.encode, _check_images(x), model_device(model)).double(), "the codes")
        if order == "index":
            return list(range(codes.shape[1]))
        if len(codes) < 2:
            raise ValueError(f"order='variance' needs at least 2 images in x, got {len(codes)}")
        scores = codes.var(0)
    return decreasing(scores)


def traversal_values(codes: torch.Tensor, num_steps: int, span: float | str) -> torch.Tensor:
    """The values each latent takes along its traversal, ``[D, num_steps]`` float32: evenly spaced
    over [−span, span] (a number: prior standard deviations, as in Higgins et al. 2017), or
    ``span="data"`` over each latent's 5th–95th percentile of the ``codes [N, D]`` of the data."""
    if span == "data":
        if len(codes) < 2:
            raise ValueError(f"span='data' needs at least 2 images in x, got {len(codes)}")
        low, high = torch.quantile(codes.double(), torch.tensor(DATA_QUANTILES, dtype=torch.float64), dim=0)
    elif isinstance(span, (int, float)) and not isinstance(span, bool) and 0 < span < math.inf:
        high = torch.full((codes.shape[1],), float(span), dtype=torch.float64)
        low = -high
    else:
        raise ValueError(f"span must be a positive finite number or 'data', got {span!r}")
    steps = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    return (low[:, None] + (high - low)[:, None] * steps).float()


def _check_rows(rows, latent_dim: int) -> list[int]:
    """An explicit traversal order: distinct latent indices in [0, latent_dim)."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"order must be one of {', '.join(TRAVERSAL_ORDERS)} or a non-empty sequence of latent indices, "
                         f"got {rows!r}")
    in_range = all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < latent_dim for d in rows)
    if not in_range or len(set(rows)) != len(rows):
        raise ValueError(f"order must hold distinct latent indices in [0, {latent_dim}), got {list(rows)!r}")
    return list(rows)


def latent_traversals(
    model: nn.Module,
    x: torch.Tensor,
    path: str | os.PathLike,
    *,
    num_steps: int = 10,
    span: float | str = 2.5,
    order: str | Sequence[int] = "kl",
) -> Path:
    """Write a PNG grid of latent traversals: one row per latent, ``num_steps`` columns.

    The seed is the first image of ``x: [N, C, H, W]``: its code ``encode(x[:1])`` has one latent
    at a time set to each value of :func:`traversal_values` (the others fixed) and is decoded.
    Rows follow :func:`traversal_order` over all of ``x`` (by default by decreasing mean KL, the
    informative latents on top), or ``order`` given as a sequence of latent indices (e.g. an
    order computed over more data than ``x``; one row each). With every latent a row the grid is
    ``D · (H + 2) + 2`` by ``num_steps · (W + 2) + 2`` pixels. ``x`` and the model's device may
    differ (``x`` is moved).
    """
    _require(model, "encode", "decode", purpose="a latent traversal")
    x = _check_images(x)
    num_steps = _check_positive_int(num_steps, "num_steps")
    device = model_device(model)
    with evaluating(model):
        codes = _check_finite(_in_batches(model.encode, x, device), "the codes")
        latent_dim = codes.shape[1]
        rows = traversal_order(model, x, order) if isinstance(order, str) else _check_rows(order, latent_dim)
        values = traversal_values(codes, num_steps, span)
        # grid[r, s] = the seed's code with latent rows[r] set to its s-th value.
        index = torch.tensor(rows)
        grid = codes[:1].expand(len(rows), num_steps, latent_dim).clone()
        grid[torch.arange(len(rows)), :, index] = values[index]
        images = _in_batches(model.decode, grid.reshape(-1, latent_dim), device)
    path = _check_path(path)
    write_png(path, image_grid(images, columns=num_steps))
    return path


def reconstructions(model: nn.Module, x: torch.Tensor, path: str | os.PathLike, *, columns: int = 8) -> Path:
    """Write a PNG grid of the images ``x: [N, C, H, W]`` and their reconstructions: rows of
    ``columns`` originals, each above the row of its reconstructions (``model.reconstruct``, or
    ``decode(encode(x))``); a short last row is filled with the white background."""
    _require(model, "encode", "decode", purpose="reconstructions")
    x = _check_images(x)
    columns = _check_positive_int(columns, "columns")
    path = _check_path(path)
    reconstruct = getattr(model, "reconstruct", None) or (lambda images: model.decode(model.encode(images)))
    with evaluating(model):
        rebuilt = _in_batches(reconstruct, x, model_device(model))
    blank = torch.ones(-len(x) % columns, *x.shape[1:])
    # [rows, 2, columns, C, H, W]: each row of originals followed by its reconstructions.
    rows = [torch.cat([images.float().cpu(), blank]).unflatten(0, (-1, columns)) for images in (x, rebuilt)]
    pairs = torch.stack(rows, dim=1)
    write_png(path, image_grid(pairs.flatten(0, 2), columns=columns))
    return path


def samples(
    model: nn.Module, n: int, path: str | os.PathLike, generator: torch.Generator | None = None, *, columns: int = 8
) -> Path:
    """Write a PNG grid of ``n`` samples ``model.sample(n, generator)`` (decoded prior draws), ``columns`` per row.
    ``generator`` must live on the model's device. Integer samples (levels, e.g. of a PixelCNN)
    become images through ``model.images_from_levels``."""
    _require(model, "sample", purpose="samples")
    n = _check_positive_int(n, "n")
    columns = _check_positive_int(columns, "columns")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    path = _check_path(path)
    with evaluating(model):
        images = model.sample(n, generator=generator)
        if not images.dtype.is_floating_point:
            # Discrete models (a PixelCNN) sample intensity levels; they map them to [0, 1] images.
            _require(model, "images_from_levels", purpose="a picture of integer samples")
            images = model.images_from_levels(images)
    write_png(path, image_grid(images.float().cpu(), columns=columns))
    return path


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib)
# ---------------------------------------------------------------------------------------------


def _figure(**options):
    """A matplotlib Figure of its own (saved through the Agg canvas, no pyplot)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"plots need matplotlib: {EVAL_EXTRA}") from error
    return Figure(layout="constrained", **options)


def _number(value, name: str) -> float:
    scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or scalar_tensor):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _rate_and_distortion(point, name: str) -> tuple[float, float]:
    """(rate, distortion) of a point with ``.rate`` and ``.distortion``, or of a pair; ``name`` is its argument."""
    if hasattr(point, "rate") and hasattr(point, "distortion"):
        rate, distortion = point.rate, point.distortion
    elif isinstance(point, Sequence) and len(point) == 2:
        rate, distortion = point
    else:
        raise TypeError(f"{name} must have .rate and .distortion or be a pair (rate, distortion), got {point!r}")
    rate, distortion = _number(rate, f"{name}.rate"), _number(distortion, f"{name}.distortion")
    if not (math.isfinite(rate) and math.isfinite(distortion)):
        raise ValueError(f"{name} must be finite, got rate {rate}, distortion {distortion}")
    return rate, distortion


def _limits(values: list[float]) -> tuple[float, float]:
    """Axis limits from 0 (or below, for negative values) to past the largest value, with room for labels."""
    low, high = min(0.0, min(values)), max(values)
    pad = 0.15 * (high - low) or 1.0
    return (low - pad if low < 0 else 0.0), high + pad


def plot_rate_distortion(
    points: Iterable,
    path: str | os.PathLike,
    *,
    entropy: float | None = None,
    labels: Sequence[str] | None = None,
    distortion_label: str = "distortion D = E[−log p(x | z)] (nats)",
    trajectory: Iterable | None = None,
) -> Path:
    """Plot distortion against rate (Alemi et al. 2018, "Fixing a broken ELBO") and write it as a PNG.

    ``points``: (rate, distortion) pairs in nats, or objects with ``.rate`` and ``.distortion``
    (:class:`aelearn.metrics.rate_distortion.RatePoint`), joined in the order given (e.g. of β);
    ``labels`` name each point. With the data entropy ``entropy`` = H, the line D = H − R is drawn
    and the region below it shaded: R + D (the negative ELBO) ≥ H for any encoder and any decoder
    whose likelihood is a normalised distribution over the data's images, so no model lies there.
    ``distortion_label`` names the vertical axis (e.g. the class distortion E[−log p(y | z)] of a
    VIB, Alemi et al. 2017). ``trajectory``: more (rate, distortion) points drawn as a thin line
    under the others, e.g. a run's path through the plane during training (its logged KL and
    reconstruction), from the first point (a circle) to the last.
    """
    points = list(points) if not isinstance(points, (str, bytes)) else points
    if not isinstance(points, list) or not points:
        raise ValueError("points must be a non-empty sequence of (rate, distortion) points")
    pairs = [_rate_and_distortion(point, f"points[{i}]") for i, point in enumerate(points)]
    if labels is not None and (isinstance(labels, str) or len(labels) != len(pairs)):
        raise ValueError(f"labels must be a sequence of one label per point ({len(pairs)}), got {labels!r}")
    if entropy is not None and not (0 <= _number(entropy, "entropy") < math.inf):
        raise ValueError(f"entropy must be a finite number ≥ 0, got {entropy!r}")
    path_points = [_rate_and_distortion(point, f"trajectory[{i}]") for i, point in enumerate(trajectory or ())]
    path = _check_path(path)
    figure = _figure(figsize=(6.0, 4.5))
    axes = figure.add_subplot()
    if path_points:
        axes.plot(*zip(*path_points), "-", color="0.6", linewidth=0.8, label="training")
        axes.plot(*path_points[0], "o", color="0.6", markerfacecolor="none")
    rates, distortions = zip(*pairs)
    axes.plot(rates, distortions, "o-", color="tab:blue", label="models")
    for label, (rate, distortion) in zip(labels or (), pairs):
        axes.annotate(str(label), (rate, distortion), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if entropy is not None:
        entropy = float(entropy)
        axes.plot([0.0, entropy], [entropy, 0.0], "k--", linewidth=1.0, label=f"D = H − R (H = {entropy:.4g} nats)")
        axes.fill_between([0.0, entropy], [entropy, 0.0], 0.0, color="0.85", label="R + D < H: infeasible")
    everything = pairs + path_points + ([(entropy, entropy)] if entropy is not None else [])
    axes.set_xlim(*_limits([rate for rate, _ in everything]))
    axes.set_ylim(*_limits([distortion for _, distortion in everything]))
    axes.set_xlabel("rate R = E[KL(q(z | x) ‖ p(z))] (nats)")
    axes.set_ylabel(distortion_label)
    axes.legend(loc="best", fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100, format="png")
    return path


def plot_metrics(scores: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Bar chart of metric scores ``{metric: {score: value}}`` (what
    :func:`aelearn.metrics.disentanglement.compute_metrics` returns), written as a PNG. Each metric
    has a panel on the [0, 1] scale for its scores in [0, 1] (accuracies, MIG, DCI...: comparable
    across panels) and one on an axis of its own for the others (nats, counts). A NaN score is
    shown as "nan" with no bar, on the [0, 1] panel."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict {metric: {score: value}}")
    panels: list[tuple[str, list[str], list[float]]] = []
    for metric, values in scores.items():
        if not isinstance(values, Mapping) or not values:
            raise ValueError(f"scores[{metric!r}] must be a non-empty dict {{score: value}}, got {values!r}")
        numbers = {str(key): _number(value, f"scores[{metric!r}][{key!r}]") for key, value in values.items()}
        unit = {key: value for key, value in numbers.items() if not value > 1.0 and not value < 0.0}
        other = {key: value for key, value in numbers.items() if key not in unit}
        panels += [(str(metric), list(group), list(group.values())) for group in (unit, other) if group]
    path = _check_path(path)
    heights = [len(names) for _, names, _ in panels]
    figure = _figure(figsize=(7.0, 0.6 * len(panels) + 0.32 * sum(heights)))
    grid = figure.add_gridspec(len(panels), 1, height_ratios=heights)
    for row, (metric, names, values) in enumerate(panels):
        axes = figure.add_subplot(grid[row])
        positions = range(len(names))
        finite = [value if math.isfinite(value) else 0.0 for value in values]
        axes.barh(positions, finite, color="tab:blue")
        axes.set_yticks(positions, names, fontsize=8)
        axes.invert_yaxis()
        axes.set_title(metric, fontsize=9, loc="left")
        axes.axvline(0.0, color="black", linewidth=0.6)
        for position, value in zip(positions, values):
            axes.annotate(f"{value:.3g}", (0.0 if not math.isfinite(value) else value, position), textcoords="offset points",
                          xytext=(3, -3), fontsize=7)
        if all(0.0 <= value <= 1.0 for value in finite):
            axes.set_xlim(0.0, 1.12)
        else:
            axes.margins(x=0.15)
        axes.tick_params(axis="x", labelsize=7)
    figure.savefig(path, dpi=100, format="png")
    return path
