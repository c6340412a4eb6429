"""Pictures (traversals, reconstructions, samples, plots) and the Markdown report of a run."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aelearn.data import FactorDataset, TensorImages
from aelearn.metrics import pictures
from aelearn.metrics.disentanglement import METRICS
from aelearn.metrics.report import PICTURES, metric_protocol, write_report
from aelearn.models import VAE, VIB, Model, split_batch
from aelearn.train import TrainConfig, train

METRIC_NAMES = list(METRICS)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """The (kind, data) chunks of a PNG file, every CRC checked."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body), f"{path}: bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        position += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", f"{path}: malformed chunk list"
    return chunks


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) of a valid 8-bit PNG; the image data decompresses to the size the header says."""
    chunks = png_chunks(path)
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[0][1][:10])
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    assert depth == 8
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * channels)
    return height, width


def read_grid(path: Path) -> np.ndarray:
    """The pixels ``[H, W, C]`` of a grid written by :func:`aelearn.train.images.write_png` (no filters)."""
    chunks = png_chunks(path)
    width, height, _, colour_type = struct.unpack(">IIBB", chunks[0][1][:10])
    channels = {0: 1, 2: 3}[colour_type]
    rows = np.frombuffer(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")), dtype=np.uint8)
    rows = rows.reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, channels)


class Probe(nn.Module):
    """A model whose answers are known: 4×4 images, 3 latents. The posterior mean of latent d is
    pixel d of the first row times ``scales[d]`` (log-variance 0), so latent d's mean KL is
    ½ scales[d]² E[x²]: with scales (0.5, 3, 1.5) the KL order is 1, 2, 0. The decoder writes
    sigmoid(z_d) into pixel (d, d) of a black image, so a traversal row shows which latent moves."""

    def __init__(self, scales=(0.5, 3.0, 1.5)):
        super().__init__()
        self.register_buffer("scales", torch.tensor(scales))

    def posterior(self, x):
        mu = x[:, 0, 0, : len(self.scales)] * self.scales
        return mu, torch.zeros_like(mu)

    def encode(self, x):
        return self.posterior(x)[0]

    def decode(self, z):
        images = torch.zeros(len(z), 1, 4, 4)
        index = torch.arange(z.shape[1])
        images[:, 0, index, index] = torch.sigmoid(z)
        return images

    def sample(self, n, generator=None):
        return self.decode(torch.randn(n, len(self.scales), generator=generator))


@pytest.fixture
def images():
    return torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def test_traversal_rows_are_the_latents_in_decreasing_kl(tmp_path, images):
    model = Probe()
    assert pictures.traversal_order(model, images) == [1, 2, 0]
    kl = pictures.latent_kl(model, images)
    expected = 0.5 * model.scales.double().square() * images[:, 0, 0, :3].double().square().mean(0)
    torch.testing.assert_close(kl, expected, rtol=1e-6, atol=0)
    path = pictures.latent_traversals(model, images, tmp_path / "sub" / "traversals.png", num_steps=5, span=2.0)
    assert path == tmp_path / "sub" / "traversals.png"
    assert png_size(path) == (3 * 6 + 2, 5 * 6 + 2)
    pixels = read_grid(path)[..., 0].astype(float)
    seed = torch.sigmoid(model.encode(images[:1])[0]).numpy() * 255
    for row, latent in enumerate([1, 2, 0]):
        for step, value in enumerate(np.linspace(-2.0, 2.0, 5)):
            top, left = 2 + row * 6, 2 + step * 6
            tile = pixels[top : top + 4, left : left + 4]
            expected_diagonal = seed.copy()
            expected_diagonal[latent] = 255 / (1 + np.exp(-value))
            np.testing.assert_allclose(tile.diagonal()[:3], np.round(expected_diagonal), atol=1)


def test_traversal_orders_and_spans(tmp_path, images):
    model = Probe(scales=(1.0, 0.2, 2.0))
    assert pictures.traversal_order(model, images, "variance") == [2, 0, 1]
    assert pictures.traversal_order(model, images, "index") == [0, 1, 2]
    codes = model.encode(images)
    values = pictures.traversal_values(codes, 4, "data")
    quantiles = np.quantile(codes.double().numpy(), [0.05, 0.95], axis=0)
    np.testing.assert_allclose(values[:, 0].numpy(), quantiles[0], rtol=1e-6)
    np.testing.assert_allclose(values[:, -1].numpy(), quantiles[1], rtol=1e-6)
    path = pictures.latent_traversals(model, images, tmp_path / "t.png", num_steps=3, span="data", order="index")
    assert png_size(path) == (20, 20)
    # An explicit order: one row per latent listed.
    assert png_size(pictures.latent_traversals(model, images[:1], tmp_path / "t.png", num_steps=3, order=[2, 0])) == (14, 20)
    for bad in ([0, 0], [3], [], "sideways"):
        with pytest.raises(ValueError, match="order"):
            pictures.latent_traversals(model, images, tmp_path / "t.png", order=bad)


class Deterministic(nn.Module):
    """An autoencoder without a posterior: traversals ordered by code variance only."""

    def encode(self, x):
        return x.flatten(1)[:, :2] * torch.tensor([1.0, 5.0])

    def decode(self, z):
        return torch.sigmoid(z.sum(1))[:, None, None, None].expand(-1, 3, 5, 5)


def test_models_without_a_posterior_and_bad_input(tmp_path, images):
    model = Deterministic()
    path = pictures.latent_traversals(model, images, tmp_path / "t.png", num_steps=2, order="variance")
    assert png_size(path) == (2 * 7 + 2, 2 * 7 + 2)
    with pytest.raises(TypeError, match="posterior"):
        pictures.latent_traversals(model, images, tmp_path / "t.png")
    with pytest.raises(TypeError, match="sample"):
        pictures.samples(model, 4, tmp_path / "s.png")
    with pytest.raises(ValueError, match="order"):
        pictures.traversal_order(Probe(), images, "alphabetical")
    with pytest.raises(ValueError, match="span"):
        pictures.latent_traversals(Probe(), images, tmp_path / "t.png", span=-1.0)
    with pytest.raises(ValueError, match="x must be a non-empty batch"):
        pictures.reconstructions(Probe(), images[0], tmp_path / "r.png")
    with pytest.raises(ValueError, match="num_steps"):
        pictures.latent_traversals(Probe(), images, tmp_path / "t.png", num_steps=0)
    nan_images = images.clone()
    nan_images[3, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pictures.latent_traversals(Probe(), nan_images, tmp_path / "t.png")


def test_reconstructions_put_each_row_above_its_reconstruction(tmp_path, images):
    model = Probe()
    path = pictures.reconstructions(model, images[:5], tmp_path / "r.png", columns=3)
    assert png_size(path) == (4 * 6 + 2, 3 * 6 + 2)
    pixels = read_grid(path)[..., 0]
    originals = np.round(images[:5, 0].numpy() * 255)
    rebuilt = np.round(model.decode(model.encode(images[:5]))[:, 0].numpy() * 255)
    for index in range(5):
        row, column = divmod(index, 3)
        left = 2 + column * 6
        np.testing.assert_array_equal(pixels[2 + 2 * row * 6 : 6 + 2 * row * 6, left : left + 4], originals[index])
        np.testing.assert_array_equal(pixels[8 + 2 * row * 6 : 12 + 2 * row * 6, left : left + 4], rebuilt[index])
    # The short last row is white background.
    assert (pixels[2 + 2 * 6 : 6 + 2 * 6, 2 + 2 * 6 : 6 + 2 * 6] == 255).all()


def test_samples_follow_the_generator(tmp_path):
    model = Probe()
    first = pictures.samples(model, 5, tmp_path / "a.png", torch.Generator().manual_seed(3), columns=4)
    second = pictures.samples(model, 5, tmp_path / "b.png", torch.Generator().manual_seed(3), columns=4)
    assert png_size(first) == (2 * 6 + 2, 4 * 6 + 2)
    assert first.read_bytes() == second.read_bytes()


class Levels(nn.Module):
    """A discrete model: samples are intensity levels 0…3, mapped to images by images_from_levels."""

    def sample(self, n, generator=None):
        return torch.randint(4, (n, 1, 2, 2), generator=generator)

    def images_from_levels(self, levels):
        return levels.float() / 3


def test_integer_samples_become_images(tmp_path):
    path = pictures.samples(Levels(), 3, tmp_path / "levels.png", torch.Generator().manual_seed(0), columns=3)
    levels = Levels().sample(3, torch.Generator().manual_seed(0))
    pixels = read_grid(path)[..., 0]
    for index in range(3):
        left = 2 + index * 4
        np.testing.assert_array_equal(pixels[2:4, left : left + 2], np.round(levels[index, 0].numpy() / 3 * 255))


def test_model_training_flag_is_restored(tmp_path, images):
    model = Probe().train()
    pictures.reconstructions(model, images, tmp_path / "r.png")
    assert model.training
    model.eval()
    pictures.samples(model, 2, tmp_path / "s.png")
    assert not model.training


def test_plots_are_pngs_and_leave_pyplot_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")

    backend = matplotlib.get_backend()
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    path = pictures.plot_rate_distortion([(0.5, 40.0), (4.0, 22.0), (9.0, 15.0)], tmp_path / "rd.png", entropy=13.5,
                                         labels=["β=16", "β=4", "β=1"], trajectory=[(20.0, 200.0), (12.0, 60.0), (9.5, 16.0)])
    height, width = png_size(path)
    assert (height, width) == (450, 600)
    points = [type("Point", (), {"rate": 2.0, "distortion": 1.0})()]
    assert png_size(pictures.plot_rate_distortion(points, tmp_path / "one.png", distortion_label="class distortion (nats)"))
    scores = {"mig": {"mig": 0.25}, "dci": {"disentanglement": 0.5, "completeness": 0.4, "informativeness_test": 0.9},
              "unsupervised": {"gaussian_total_correlation": 3.5, "mutual_info_score": float("nan")}}
    height, width = png_size(pictures.plot_metrics(scores, tmp_path / "metrics.png"))
    assert width == 700 and height > 200
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda p: pictures.plot_rate_distortion([], p), ValueError, "non-empty"),
        (lambda p: pictures.plot_rate_distortion([(1.0, float("inf"))], p), ValueError, "finite"),
        (lambda p: pictures.plot_rate_distortion([(1.0, 2.0, 3.0)], p), TypeError, "points\\[0\\]"),
        (lambda p: pictures.plot_rate_distortion([(1.0, 2.0)], p, labels=["a", "b"]), ValueError, "labels"),
        (lambda p: pictures.plot_rate_distortion([(1.0, 2.0)], p, entropy=-1.0), ValueError, "entropy"),
        (lambda p: pictures.plot_rate_distortion([(1.0, 2.0)], p, trajectory=[(1.0, 2.0), None]), TypeError, "trajectory\\[1\\]"),
        (lambda p: pictures.plot_metrics({}, p), ValueError, "non-empty"),
        (lambda p: pictures.plot_metrics({"mig": 0.3}, p), ValueError, "scores\\['mig'\\]"),
        (lambda p: pictures.plot_metrics({"mig": {"mig": "high"}}, p), TypeError, "number"),
    ],
)
def test_plot_bad_input(tmp_path, call, error, words):
    pytest.importorskip("matplotlib")
    with pytest.raises(error, match=words):
        call(tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install aelearn\[eval\]"):
        pictures.plot_metrics({"mig": {"mig": 0.5}}, tmp_path / "m.png")


# The report of a run ---------------------------------------------------------------------------


class Squares(FactorDataset):
    """A 2×2 white square on a black 8×8 image at one of 4 × 4 positions: 16 distinct images, so
    the data entropy under the uniform grid is log 16."""

    factor_names = ("row", "column")
    factor_sizes = (4, 4)
    observation_shape = (1, 8, 8)

    def images_from_factors(self, factors):
        self.check_factors(factors)
        images = torch.zeros(len(factors), 1, 8, 8)
        for offset in (0, 1):
            for other in (0, 1):
                images[torch.arange(len(factors)), 0, 2 * factors[:, 0] + offset, 2 * factors[:, 1] + other] = 1.0
        return images


class MeanImage(Model):
    """A model with no encoder: one learned image, samples are it plus noise."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(1, 8, 8))

    def loss(self, batch, *, step):
        images, _ = split_batch(batch)
        return {"loss": (images - torch.sigmoid(self.logits)).square().flatten(1).sum(1).mean()}

    def sample(self, n, generator=None):
        noise = torch.randn(n, 1, 8, 8, generator=generator, device=self.logits.device)
        return (torch.sigmoid(self.logits) + 0.1 * noise).clamp(0, 1)


def tiny_run(tmp_path, name: str, model: nn.Module) -> Path:
    config = TrainConfig(run_dir=str(tmp_path / name), model="vae", model_options={"latent_dim": 3, "mlp_hidden": [16]},
                         steps=4, batch_size=8, lr=1e-2, log_every=2, checkpoint_every=4, image_every=0, progress=False,
                         tensorboard="off", eval_examples=16, image_count=8, device="cpu")
    return train(config, model=model, dataset=Squares())


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE((1, 8, 8), 3, mlp_hidden=(16,))


SMALL = dict(num_train=60, examples=16, aggregate_examples=12, likelihood_samples=4)


def linked_pictures(report: Path) -> list[Path]:
    return [report.parent / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


def headings(report: Path) -> list[str]:
    return [line[3:] for line in report.read_text().splitlines() if line.startswith("## ")]


@pytest.mark.usefixtures("one_thread")
def test_report_of_a_vae_on_factor_data(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    run = tiny_run(tmp_path, "vae", tiny_vae())
    report = write_report(run, dataset=Squares(), **SMALL)
    assert report == run / "report.md"
    assert headings(report) == ["Loss terms", "Rate and distortion", "Latents", "Reconstructions and samples",
                                "Disentanglement metrics", "ELBO decomposition", "Log-likelihood", "Protocol"]
    pictures_linked = linked_pictures(report)
    assert sorted(p.name for p in pictures_linked) == sorted(PICTURES)
    for picture in pictures_linked:
        png_size(picture)
    assert png_size(run / "eval" / "traversals.png") == (3 * 10 + 2, 10 * 10 + 2)
    assert png_size(run / "eval" / "reconstructions.png") == (2 * 10 + 2, 8 * 10 + 2)
    results = json.loads((run / "eval.json").read_text())
    # The loss terms of evaluate() at the top level, as before; the rate is their KL (same examples).
    assert results["step"] == 4 and results["examples"] == 16 and {"loss", "reconstruction", "kl"} <= set(results)
    assert results["rate_distortion"]["rate"] == pytest.approx(results["kl"], rel=1e-5)
    assert results["data_entropy"] == pytest.approx(math.log(16), rel=1e-12)
    # Every metric is scored, or the report says why not (a tiny protocol may leave a class out).
    skipped = {name for name in METRIC_NAMES if f"Not computed: {name} (" in report.read_text()}
    assert set(results["metrics"]) | skipped == set(METRIC_NAMES)
    decomposition = results["elbo_decomposition"]
    assert decomposition["num_samples"] == 12 and decomposition["dataset_size"] == 12
    assert decomposition["kl_sum"] == pytest.approx(decomposition["sampled_kl"], abs=1e-4)
    assert results["log_likelihood"]["num_samples"] == 4 and results["log_likelihood"]["num_examples"] == 16
    latents = results["latents"]
    assert sorted(latents["order"]) == [0, 1, 2] and len(latents["kl"]) == 3
    assert [latents["kl"][d] for d in latents["order"]] == sorted(latents["kl"], reverse=True)
    text = report.read_text()
    assert "D = H − R" in text and "num_train=60" in text and "--num-train 60" in text and "path during training" in text
    assert "|" not in "".join(re.findall(r"q\(z\\\|x\)", text)).replace("\\|", "")
    # Same seed, same numbers (a metric's score does not depend on which others run); a later
    # report without metrics drops their picture.
    write_report(run, dataset=Squares(), metrics=["mig"], **SMALL)
    again = json.loads((run / "eval.json").read_text())
    for key in ("loss", "rate_distortion", "latents", "elbo_decomposition", "log_likelihood"):
        assert again[key] == results[key], key
    assert again["metrics"] == {"mig": results["metrics"]["mig"]}
    write_report(run, dataset=Squares(), metrics=[], **{**SMALL, "num_train": None})
    assert not (run / "eval" / "metrics.png").exists()
    assert "Not computed (no metric asked for)." in report.read_text()


@pytest.mark.usefixtures("one_thread")
def test_report_of_a_model_without_an_encoder_says_what_it_skips(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    run = tiny_run(tmp_path, "mean", MeanImage())
    report = write_report(run, model=MeanImage(), dataset=Squares(), **SMALL)
    text = report.read_text()
    assert [p.name for p in linked_pictures(report)] == ["samples.png"]
    png_size(run / "eval" / "samples.png")
    for section in ("Rate and distortion", "ELBO decomposition", "Log-likelihood"):
        assert f"## {section}\n\nNot computed: the model has no Gaussian encoder" in text
    assert "## Latents\n\nNot computed: the model has no encoder" in text
    assert "## Disentanglement metrics\n\nNot computed: the model has no encoder" in text
    assert "No reconstructions" in text
    results = json.loads((run / "eval.json").read_text())
    assert "loss" in results and not {"rate_distortion", "metrics", "elbo_decomposition", "latents"} & set(results)


@pytest.mark.usefixtures("one_thread")
def test_report_without_factors_or_matplotlib(tmp_path, monkeypatch):
    run = tiny_run(tmp_path, "vae", tiny_vae())
    images = Squares().images_from_factors(Squares().index_to_factors(torch.arange(16)))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    report = write_report(run, dataset=TensorImages(images), metrics=None, **SMALL)
    text = report.read_text()
    results = json.loads((run / "eval.json").read_text())
    # No factors: the unsupervised scores only, no data entropy; no plots, said so.
    assert list(results["metrics"]) == ["unsupervised"] and "data_entropy" not in results
    assert "unknown for data without a factor grid" in text
    assert "not drawn, plots need matplotlib: pip install aelearn[eval]" in text
    assert sorted(p.name for p in linked_pictures(report)) == ["reconstructions.png", "samples.png", "traversals.png"]
    report = write_report(run, dataset=TensorImages(images), metrics=["mig", "unsupervised"], **SMALL)
    assert "Not computed: mig (the dataset `dsprites` has no ground-truth factors)." in report.read_text()


def test_report_bad_input(tmp_path):
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        write_report(tmp_path, metrics=["mig", "nope"])
    with pytest.raises(TypeError, match="metrics must be a list"):
        write_report(tmp_path, metrics="mig")
    with pytest.raises(ValueError, match="examples must be ≥ 1"):
        write_report(tmp_path, examples=0)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path, metrics=[])


def test_metric_protocol_scales_the_published_sizes():
    settings, overrides = metric_protocol(["factor_vae", "dci", "mig"], 1000)
    assert overrides == {"num_train": 1000, "num_test": 500, "num_eval": 500, "num_variance_estimate": 1000}
    assert settings["factor_vae"]["num_eval"] == 500 and settings["factor_vae"]["batch_size"] == 64
    assert settings["dci"]["classifier"] == "gbt" and settings["mig"]["num_bins"] == 20
    settings, overrides = metric_protocol(["mig"], None)
    assert overrides == {} and settings["mig"]["num_train"] == 10000


@pytest.mark.usefixtures("one_thread")
def test_report_of_a_vib_classifier(tmp_path):
    pytest.importorskip("matplotlib")

    def vib():
        torch.manual_seed(0)
        return VIB.for_dataset(Squares(), label_factor="row", latent_dim=3, mlp_hidden=(16,))

    run = tiny_run(tmp_path, "vib", vib())
    report = write_report(run, model=vib(), dataset=Squares(), **{**SMALL, "metrics": ["mig"]})
    results = json.loads((run / "eval.json").read_text())
    assert set(results["rate_distortion"]) == {"rate", "class_distortion"}
    assert results["rate_distortion"]["rate"] == pytest.approx(results["rate"], rel=1e-5)
    assert list(results["metrics"]) == ["mig"] and len(results["latents"]["kl"]) == 3
    text = report.read_text()
    assert "class distortion D_y" in text and "No reconstructions" in text and "No samples" in text
    assert "## ELBO decomposition\n\nNot computed" in text
    assert sorted(p.name for p in linked_pictures(report)) == ["metrics.png", "rate_distortion.png"]
