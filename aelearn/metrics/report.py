"""The evaluation report of a trained run: ``RUN_DIR/report.md``, its pictures in ``RUN_DIR/eval/``
and every number in ``RUN_DIR/eval.json`` (what ``aelearn eval RUN_DIR`` writes).

Sections, each computed when the model and the data allow it (the report says why one is absent):

* loss terms of the last checkpoint (:func:`aelearn.train.evaluate`);
* rate and distortion (:mod:`aelearn.metrics.rate_distortion`; the class distortion of a VIB),
  plotted with the bound D = H − R where the data entropy H is known (a factor dataset) and the
  run's path through the plane during training (its logged KL and distortion);
* the latents: mean KL of each, the active units (Burda et al. 2016), traversals ordered by KL;
* reconstructions and samples;
* disentanglement metrics (:func:`aelearn.metrics.disentanglement.compute_metrics`) when the data
  has ground-truth factors and the model an encoder, with a bar chart;
* the ELBO decomposition of Chen et al. 2018 (:func:`aelearn.metrics.decomposition.elbo_decomposition`)
  and the IWAE log-likelihood (:func:`aelearn.metrics.likelihood.log_likelihood`) when the model
  has a Gaussian posterior, a decoder and a likelihood;
* the protocol: example counts, metric settings, seeds and the command that repeats it.

Every random choice comes from a generator seeded by the run's seed and a tag naming the section
(:func:`aelearn.train.rng.derive_seed`): evaluating a run twice gives the same numbers and pictures.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from aelearn.data.factors import FactorDataset
from aelearn.metrics import pictures
from aelearn.metrics.rate_distortion import (
    batches,
    data_entropy,
    evaluating,
    model_device,
    rate_distortion,
    rate_distortion_supervised,
)
from aelearn.train.evaluate import evaluate, load_run
from aelearn.train.logging import read_metrics
from aelearn.train.rng import derive_seed

REPORT_FILE = "report.md"
RESULTS_FILE = "eval.json"
PICTURE_DIR = "eval"
PICTURES = ("reconstructions.png", "samples.png", "traversals.png", "rate_distortion.png", "metrics.png")
# Held-out sizes of the published protocols relative to num_train (disentanglement_lib: 10,000
# training points, 5,000 held out, 10,000 for FactorVAE's variance estimate).
PROTOCOL_RATIOS = {"num_train": 1.0, "num_test": 0.5, "num_eval": 0.5, "num_variance_estimate": 1.0}
UNSUPERVISED = "unsupervised"
NOT_A_VAE = "the model has no Gaussian encoder `posterior(x)` with a decoder and likelihood"
TRAVERSAL_STEPS = 10
TRAVERSAL_SPAN = 2.5
BATCH_SIZE = 256


def _check_count(value, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def _has(model: nn.Module, *methods: str) -> bool:
    return all(callable(getattr(model, name, None)) for name in methods)


def _has_decoder_likelihood(model: nn.Module) -> bool:
    return _has(model, "posterior", "decoder") and callable(getattr(getattr(model, "likelihood", None), "nll", None))


def _has_factors(dataset) -> bool:
    """Ground-truth factors, as the supervised metrics take them."""
    return bool(getattr(dataset, "factor_sizes", None)) and _has(dataset, "sample_factors", "images_from_factors")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _cell(value) -> str:
    """A Markdown table cell: numbers to 6 significant digits (as ``aelearn eval`` prints them),
    integers as they are, text with its pipes escaped (q(z|x) would split the cell)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.6g}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(_cell(cell) for cell in header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]


def _options(options: dict) -> str:
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in options.items()) or "defaults"


def metric_protocol(metrics: Sequence[str], num_train: int | None) -> tuple[dict[str, dict], dict[str, int]]:
    """``(settings, overrides)``: the settings each metric of ``metrics`` runs with (its defaults,
    disentanglement_lib's published protocol, with the sizes scaled to ``num_train``) and the
    size overrides to pass to :func:`~aelearn.metrics.disentanglement.compute_metrics`."""
    from aelearn.metrics.disentanglement import METRICS

    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; valid metrics: {', '.join(METRICS)}")
    settings: dict[str, dict] = {}
    accepted: set[str] = set()
    for name in metrics:
        parameters = inspect.signature(METRICS[name]).parameters
        accepted |= set(parameters)
        settings[name] = {
            key: parameter.default
            for key, parameter in parameters.items()
            if parameter.default is not inspect.Parameter.empty and key != "generator"
            and isinstance(parameter.default, (int, float, str, bool, type(None)))
        }
    overrides = {}
    if num_train is not None:
        overrides = {key: max(1, round(ratio * num_train)) for key, ratio in PROTOCOL_RATIOS.items() if key in accepted}
    for name in settings:
        settings[name].update({key: value for key, value in overrides.items() if key in settings[name]})
    return settings, overrides


def _representation(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's ``encode`` as a representation function: images on any device → CPU codes."""

    def representation(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(x.to(device)).float().cpu()

    return representation


def _example_indices(config, dataset: Dataset, examples: int | None) -> list[int]:
    """The examples :func:`aelearn.train.evaluate` averages over (same count, same seed)."""
    count = min(config.eval_examples if examples is None else examples, len(dataset))
    if count < 1:
        raise ValueError(f"examples must be ≥ 1 (the run's eval_examples is {config.eval_examples})")
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "eval-examples"))
    return torch.randperm(len(dataset), generator=generator)[:count].tolist()


def _images_of(dataset: Dataset, indices: list[int]) -> torch.Tensor:
    """The images ``[n, C, H, W]`` of ``dataset[indices]`` on the CPU."""
    return torch.cat([images for images, _ in batches(Subset(dataset, indices), BATCH_SIZE, torch.device("cpu"))])


class _Report:
    """The sections of one report, collected as Markdown lines and JSON numbers."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.picture_dir = run_dir / PICTURE_DIR
        self.lines: list[str] = []
        self.results: dict = {}
        self.protocol: dict = {}
        self.seconds: dict[str, float] = {}
        self.written: set[str] = set()

    def section(self, title: str, *lines: str) -> None:
        self.lines += ["", f"## {title}", "", *lines]

    def picture(self, name: str, caption: str, draw: Callable[[Path], Path]) -> None:
        """Draw ``name`` into the picture directory and link it; a missing plotting library is noted."""
        try:
            draw(self.picture_dir / name)
        except ImportError as error:
            self.lines += ["", f"({caption}: not drawn, {error})"]
            return
        self.written.add(name)
        self.lines += ["", f"![{caption}]({PICTURE_DIR}/{name})"]

    def timed(self, name: str, function: Callable):
        start = time.perf_counter()
        value = function()
        self.seconds[name] = time.perf_counter() - start
        return value


def write_report(
    run_dir: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    num_train: int | None = None,
    examples: int | None = None,
    aggregate_examples: int | None = None,
    likelihood_samples: int = 100,
    entropy: bool = True,
    device: str = "auto",
    model: nn.Module | None = None,
    dataset: Dataset | None = None,
) -> Path:
    """Evaluate the run in ``run_dir`` and write ``report.md``, ``eval/*.png`` and ``eval.json`` there; the report's path.

    ``metrics``: names from :data:`aelearn.metrics.disentanglement.METRICS` (None: all of them
    for data with ground-truth factors, else the unsupervised scores; ``[]``: none).
    ``num_train``: the metrics' training-set size (None: the published protocol, 10,000), the
    held-out sizes scaled with it as published (:data:`PROTOCOL_RATIOS`).
    ``examples``: the examples the loss terms, rate, distortion, latent KL and pictures use, and
    the number of codes of the ELBO decomposition (None: the run's ``eval_examples``), drawn as
    :func:`aelearn.train.evaluate` draws them. ``aggregate_examples``: the examples whose
    posteriors form the aggregate posterior q(z) of the decomposition (None: the whole dataset,
    as Chen et al. 2018; 0: no decomposition). ``likelihood_samples``: K of the IWAE
    log-likelihood over the examples (0: not computed). ``entropy``: compute the data entropy H
    of a factor dataset for the R–D bound (it renders every image once: ~25 s for dSprites on
    one core).
    ``model``, ``dataset``: instead of the ones the run's configuration names (as
    :func:`aelearn.train.load_run`). The ``eval.json`` written holds the numbers of
    :func:`aelearn.train.evaluate` at its top level, as before, and the other sections under keys
    of their own.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is not a directory (give the run directory of 'aelearn train')")
    examples = _check_count(examples, "examples", 1)
    num_train = _check_count(num_train, "num_train", 1)
    aggregate_examples = _check_count(aggregate_examples, "aggregate_examples", 0)
    likelihood_samples = _check_count(likelihood_samples, "likelihood_samples", 0)
    if metrics is not None:
        if isinstance(metrics, str) or not all(isinstance(name, str) for name in metrics):
            raise TypeError(f"metrics must be a list of metric names or None, got {metrics!r}")
        metrics = list(metrics)
        metric_protocol(metrics, num_train)
    config, model, dataset, step = load_run(run_dir, model=model, dataset=dataset, device=device)
    target = model_device(model)
    has_encoder, has_decoder = _has(model, "encode"), _has(model, "decode")
    has_factors = _has_factors(dataset)
    if metrics is None:
        from aelearn.metrics.disentanglement import METRICS

        metrics = list(METRICS) if has_factors else [UNSUPERVISED]
    settings, overrides = metric_protocol(metrics, num_train)

    report = _Report(run_dir)
    report.picture_dir.mkdir(exist_ok=True)
    indices = _example_indices(config, dataset, examples)
    report.protocol["examples"] = {"count": len(indices), "drawn_by": "evaluate (seed tag 'eval-examples')",
                                   "dataset_size": len(dataset)}

    losses = report.timed("loss_terms", lambda: evaluate(run_dir, model=model, dataset=dataset, examples=len(indices),
                                                         device=device))
    report.results.update(losses)
    report.section(
        "Loss terms",
        f"The loss terms of the checkpoint at step {step}, averaged over {len(indices)} examples of the training data:",
        "",
        *_table(["term", "value"], [(key, value) for key, value in losses.items() if key not in ("step", "examples")]),
    )
    selected = Subset(dataset, indices)
    # The pictures show the first examples (the traversals start from the first).
    images = _images_of(dataset, indices[: config.image_count])
    _rate_distortion_section(report, config, model, dataset, selected, entropy)
    _latent_section(report, model, selected, images, has_encoder, has_decoder)
    _image_section(report, config, model, images, has_encoder, has_decoder, target)
    _metric_section(report, config, model, dataset, metrics, settings, overrides, has_encoder, has_factors, target)
    _decomposition_section(report, config, model, dataset, len(indices), aggregate_examples)
    _likelihood_section(report, config, model, selected, likelihood_samples)
    report.section("Protocol", *_protocol_lines(report, config, run_dir, metrics, num_train, examples, aggregate_examples,
                                                likelihood_samples, entropy))

    for name in PICTURES:
        if name not in report.written:
            (report.picture_dir / name).unlink(missing_ok=True)
    report.results["protocol"] = report.protocol
    report.results["seconds"] = report.seconds
    _write_atomically(run_dir / RESULTS_FILE, json.dumps(report.results, indent=2) + "\n")
    title = [f"# Evaluation of {run_dir.name}", "",
             f"Model `{config.model}` ({_options(config.model_options)}) trained on `{config.data}` "
             f"({_options(config.data_options)}) for {step} of {config.steps} steps, seed {config.seed}. "
             f"Every number below is in `{RESULTS_FILE}`; the protocol is at the end."]
    path = run_dir / REPORT_FILE
    _write_atomically(path, "\n".join(title + report.lines) + "\n")
    return path


def _rate_distortion_section(report: _Report, config, model, dataset, selected, entropy: bool) -> None:
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "report-rate-distortion"))
    supervised = _has(model, "posterior", "targets", "class_nll")
    if not (supervised or _has_decoder_likelihood(model)):
        report.section("Rate and distortion", f"Not computed: {NOT_A_VAE} (nor a VIB classifier).")
        return
    if supervised:
        point = report.timed("rate_distortion", lambda: rate_distortion_supervised(model, selected, batch_size=BATCH_SIZE,
                                                                                      generator=generator))
        distortion, label = point.class_distortion, "class distortion D_y = E[−log p(y | z)] (nats)"
        rows = [("rate R = E KL(q(z|x) ‖ p(z))", point.rate), ("class distortion D_y = E −log p(y|z)", distortion)]
    else:
        point = report.timed("rate_distortion", lambda: rate_distortion(model, selected, batch_size=BATCH_SIZE,
                                                                           generator=generator))
        distortion, label = point.distortion, "distortion D = E[−log p(x | z)] (nats)"
        rows = [("rate R = E KL(q(z|x) ‖ p(z))", point.rate), ("distortion D = E −log p(x|z)", distortion),
                ("R + D (negative ELBO)", point.rate + distortion)]
    report.results["rate_distortion"] = point._asdict()
    entropy_nats = None
    if entropy and isinstance(dataset, FactorDataset) and not supervised:
        entropy_nats = report.timed("data_entropy", lambda: data_entropy(dataset))
        report.results["data_entropy"] = entropy_nats
        rows.append(("data entropy H (uniform factor grid)", entropy_nats))
    lines = [f"Nats per example, over the {len(selected)} examples above, one code z ~ q(z|x) each.", "",
             *_table(["quantity", "value"], rows)]
    if entropy_nats is not None:
        lines += ["", "No encoder and decoder pair reaches below the line D = H − R (R + D ≥ H) when p(x|z) is a normalised "
                  "distribution over the images (binary images under a Bernoulli decoder); a Gaussian decoder's D is a "
                  "density, for which the line is a guide only."]
    elif not supervised:
        lines += ["", "The data entropy H is " + ("not computed (entropy off)." if not entropy else
                                                  "unknown for data without a factor grid: no D = H − R line.")]
    report.section("Rate and distortion", *lines)
    trajectory = _training_trajectory(report.run_dir, *(("rate", "class_nll") if supervised else ("kl", "reconstruction")))
    if trajectory:
        report.lines += ["", "The grey line is the run's path during training: its logged KL and distortion (means over "
                         "the training batches of each logging interval), from the circle at its first log."]
    report.picture("rate_distortion.png", "rate–distortion plane", lambda path: pictures.plot_rate_distortion(
        [(point.rate, distortion)], path, entropy=entropy_nats, labels=[f"step {report.results['step']:.0f}"],
        distortion_label=label, trajectory=trajectory))


def _training_trajectory(run_dir: Path, rate: str, distortion: str) -> list[tuple[float, float]]:
    """The (rate, distortion) pairs of the run's training log (metrics.csv), rows with both finite."""
    try:
        log = read_metrics(run_dir)
    except FileNotFoundError:
        return []
    if rate not in log or distortion not in log:
        return []
    return [(r, d) for r, d in zip(log[rate], log[distortion]) if math.isfinite(r) and math.isfinite(d)]


def _latent_statistics(model: nn.Module, selected: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(codes [n, D], mean KL of each latent [D] or None)`` float64 of the examples, read in
    batches: the posterior means and KL(q(z_d|x) ‖ N(0, 1)) when the model has ``posterior``,
    else ``encode``'s codes only."""
    codes, kl_sum = [], None
    with evaluating(model):
        for images, _ in batches(selected, BATCH_SIZE, device):
            if not _has(model, "posterior"):
                codes.append(model.encode(images).double().cpu())
                continue
            mu, logvar = (part.double().cpu() for part in model.posterior(images))
            kl = pictures.kl_per_latent(mu, logvar).sum(0)
            kl_sum = kl if kl_sum is None else kl_sum + kl
            codes.append(mu)
    codes = torch.cat(codes)
    if not torch.isfinite(codes).all() or (kl_sum is not None and not torch.isfinite(kl_sum).all()):
        raise ValueError("the model's codes of the examples hold NaN or Inf")
    return codes, None if kl_sum is None else kl_sum / len(codes)


def _latent_section(report: _Report, model, selected, images: torch.Tensor, has_encoder: bool, has_decoder: bool) -> None:
    from aelearn.metrics.information import active_units

    if not has_encoder:
        report.section("Latents", "Not computed: the model has no encoder (`encode(x)`), so it has no latents to traverse "
                       "and no disentanglement metrics either.")
        return
    codes, kl = _latent_statistics(model, selected, model_device(model))
    # Decreasing KL, or code variance without a posterior: traversal_order's rule, over all the examples.
    scores = kl if kl is not None else (codes.var(0) if len(codes) >= 2 else torch.zeros(codes.shape[1]))
    order = pictures.decreasing(scores)
    units = active_units(codes) if len(codes) >= 2 else None
    report.results["latents"] = {"order": order, "kl": None if kl is None else kl.tolist(),
                                 "active_units": None if units is None else units.count,
                                 "variance_of_mean": None if units is None else units.variances}
    header = ["latent"] + (["mean KL (nats)"] if kl is not None else []) + (["Var_x E[z_d|x]"] if units else [])
    rows = [[latent] + ([float(kl[latent])] if kl is not None else []) + ([units.variances[latent]] if units else [])
            for latent in order]
    ranked_by = "mean KL(q(z_d|x) ‖ N(0, 1))" if kl is not None else "variance of the code"
    active = f"; {units.count} of {len(units.variances)} active (Var_x E[z_d|x] > 0.01, Burda et al. 2016)." if units else "."
    report.section("Latents", f"The latents by decreasing {ranked_by} over the {len(codes)} examples (the rows of the "
                   f"traversals below){active}", "", *_table(header, rows))
    if has_decoder:
        report.lines += ["", "Traversals: the code of the first example with one latent at a time set to "
                         f"{TRAVERSAL_STEPS} values evenly spaced over [−{TRAVERSAL_SPAN}, {TRAVERSAL_SPAN}] "
                         "(prior standard deviations), decoded; "
                         "one row per latent, in the order of the table."]
        report.picture("traversals.png", "latent traversals", lambda path: pictures.latent_traversals(
            model, images[:1], path, num_steps=TRAVERSAL_STEPS, span=TRAVERSAL_SPAN, order=order))
        report.protocol["traversals"] = {"seed_example": 0, "num_steps": TRAVERSAL_STEPS, "span": TRAVERSAL_SPAN,
                                         "order": "kl" if kl is not None else "variance"}


def _image_section(report: _Report, config, model, images, has_encoder: bool, has_decoder: bool, target) -> None:
    count = len(images)
    title = "Reconstructions and samples"
    if has_encoder and has_decoder:
        report.section(title, f"The first {count} examples, each row above its reconstructions (the decoded posterior mean):")
        report.picture("reconstructions.png", "reconstructions", lambda path: pictures.reconstructions(model, images, path))
    else:
        report.section(title, "No reconstructions: the model has no encoder and decoder pair.")
    report.protocol["pictures"] = {"examples": count}
    if _has(model, "sample"):
        generator = torch.Generator(target).manual_seed(derive_seed(config.seed, "report-samples"))
        report.lines += ["", f"{count} samples from the prior, decoded:"]
        report.picture("samples.png", "samples", lambda path: pictures.samples(model, count, path, generator))
        report.protocol["pictures"]["samples_seed_tag"] = "report-samples"
    else:
        report.lines += ["", "No samples: the model has no `sample(n)`."]


def _metric_section(report: _Report, config, model, dataset, metrics, settings, overrides, has_encoder, has_factors,
                    target) -> None:
    title = "Disentanglement metrics"
    if not metrics:
        report.section(title, "Not computed (no metric asked for).")
        return
    if not has_encoder:
        report.section(title, "Not computed: the model has no encoder, so no representation to score.")
        return
    from aelearn.metrics.disentanglement import compute_metrics

    notes = []
    if not has_factors:
        supervised = [name for name in metrics if name != UNSUPERVISED]
        if supervised:
            notes.append(f"Not computed: {', '.join(supervised)} (the dataset `{config.data}` has no ground-truth factors).")
        metrics = [name for name in metrics if name == UNSUPERVISED]
    representation = _representation(model, target)
    scores: dict[str, dict[str, float]] = {}
    with evaluating(model):
        for name in metrics:
            # One metric per call, each from a generator of the same seed: compute_metrics gives a
            # metric the same seed whichever others run, so the scores equal those of one call.
            generator = torch.Generator().manual_seed(derive_seed(config.seed, "report-metrics"))
            options = {key: value for key, value in overrides.items() if key in settings[name]}
            try:
                scores.update(report.timed(f"metric {name}", lambda: compute_metrics(representation, dataset, [name],
                                                                                      generator=generator, **options)))
            except ValueError as error:
                # The data decides these (a constant latent, too few classes in a sample): the
                # other sections and metrics still stand.
                notes.append(f"Not computed: {name} ({error}).")
    report.results["metrics"] = scores
    report.protocol["metrics"] = {"settings": {name: settings[name] for name in metrics}, "seed_tag": "report-metrics"}
    rows = [(metric, key, value) for metric, values in scores.items() for key, value in values.items()]
    lines = ["The representation is `encode(x)` (a VAE's posterior mean); protocols as published by disentanglement_lib"
             + (f", sizes scaled to num_train = {overrides['num_train']}" if "num_train" in overrides else "")
             + " (settings under Protocol)."]
    if rows:
        lines += ["", *_table(["metric", "score", "value"], rows)]
    report.section(title, *lines, *(["", *notes] if notes else []))
    if scores:
        report.picture("metrics.png", "metric scores", lambda path: pictures.plot_metrics(scores, path))


def _skipped(report: _Report, title: str, model, count: int | None, option: str) -> bool:
    """True, with the section written as skipped, when ``option`` (``count``) is 0 or the model is
    not the Gaussian-encoder, decoder and likelihood kind the estimators take."""
    if count == 0:
        report.section(title, f"Not computed ({option} = 0).")
        return True
    if not _has_decoder_likelihood(model):
        report.section(title, f"Not computed: {NOT_A_VAE}.")
        return True
    return False


def _likelihood_section(report: _Report, config, model, selected, num_samples: int) -> None:
    title = "Log-likelihood"
    if _skipped(report, title, model, num_samples, "likelihood_samples"):
        return
    from aelearn.metrics.likelihood import log_likelihood

    generator = torch.Generator().manual_seed(derive_seed(config.seed, "report-likelihood"))
    estimate = report.timed("log_likelihood", lambda: log_likelihood(model, selected, num_samples=num_samples,
                                                                     generator=generator))
    report.results["log_likelihood"] = estimate
    report.protocol["log_likelihood"] = {"num_samples": num_samples, "num_examples": len(selected),
                                         "seed_tag": "report-likelihood"}
    rows = [("log p(x), IWAE bound (nats)", estimate["log_likelihood"]), ("standard error", estimate["std_error"]),
            ("bits per dimension", estimate["bits_per_dim"]), ("ELBO, same codes (nats)", estimate["elbo"])]
    report.section(title, f"The importance-weighted bound of Burda et al. (2016) with K = {num_samples} codes per example, "
                   f"over the {len(selected)} examples (a lower bound on log p(x); for a Bernoulli decoder on grey levels "
                   "p(x|z) is not a normalised distribution and neither is the bound).", "",
                   *_table(["quantity", "value"], rows))


def _decomposition_section(report: _Report, config, model, dataset, num_codes: int, aggregate_examples: int | None) -> None:
    title = "ELBO decomposition"
    if _skipped(report, title, model, aggregate_examples, "aggregate_examples"):
        return
    from aelearn.metrics.decomposition import elbo_decomposition

    generator = torch.Generator().manual_seed(derive_seed(config.seed, "report-decomposition"))
    aggregate = dataset
    if aggregate_examples is not None and aggregate_examples < len(dataset):
        order = torch.randperm(len(dataset), generator=generator)[:aggregate_examples].sort().values
        aggregate = Subset(dataset, order.tolist())
    num_samples = min(num_codes, len(aggregate))
    terms = report.timed("elbo_decomposition", lambda: elbo_decomposition(model, aggregate, num_samples=num_samples,
                                                                            batch_size=BATCH_SIZE, generator=generator))
    report.results["elbo_decomposition"] = terms._asdict()
    report.protocol["elbo_decomposition"] = {"aggregate_examples": terms.dataset_size, "num_samples": terms.num_samples,
                                             "seed_tag": "report-decomposition"}
    rows = [
        ("index-code mutual information", terms.mutual_information),
        ("total correlation", terms.total_correlation),
        ("dimension-wise KL", terms.dimensionwise_kl),
        ("sum of the three", terms.kl_sum),
        ("E KL(q(z|x) ‖ p(z)), closed form", terms.analytic_kl),
        ("reconstruction E −log p(x|z)", terms.reconstruction),
    ]
    whole = "the whole dataset" if terms.dataset_size == len(dataset) else f"{terms.dataset_size} random examples"
    report.section(title, f"Chen et al. (2018): the KL term split over {terms.num_samples} codes z ~ q(z|x), with the exact "
                   f"aggregate posterior q(z) of {whole} ({terms.dataset_size} posteriors). Nats per example.", "",
                   *_table(["term", "value"], rows))


def _protocol_lines(report: _Report, config, run_dir: Path, metrics, num_train, examples, aggregate_examples, likelihood_samples,
                    entropy) -> list[str]:
    protocol = report.protocol
    lines = [f"- Examples: {protocol['examples']['count']} of the {protocol['examples']['dataset_size']} of the training data, "
             f"drawn without replacement as `aelearn.train.evaluate` draws them (run seed {config.seed}).",
             "- Random choices: generators seeded by the run's seed and a tag per section (`aelearn.train.rng.derive_seed`)."]
    for section in ("traversals", "pictures", "elbo_decomposition", "log_likelihood"):
        if section in protocol:
            lines.append(f"- {section}: {json.dumps(protocol[section])}.")
    for name, values in protocol.get("metrics", {}).get("settings", {}).items():
        lines.append(f"- Metric `{name}`: {_options(values)}.")
    if report.seconds:
        lines.append("- Time (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in report.seconds.items()) + ".")
    command = ["aelearn", "eval", str(run_dir), "--metrics", ",".join(metrics) or "none"]
    options = (("--num-train", num_train), ("--examples", examples), ("--aggregate-examples", aggregate_examples),
               ("--iwae-samples", likelihood_samples))
    for flag, value in options:
        if value is not None:
            command += [flag, str(value)]
    if not entropy:
        command.append("--no-entropy")
    lines += ["", "Repeat with:", "", "    " + shlex.join(command)]
    return lines
