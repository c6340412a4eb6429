"""Rate–distortion (aelearn.metrics.rate_distortion), the VIB model (aelearn.models.vib), and the
exact entropy of a factor dataset."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aelearn.data import FactorDataset, TensorImages
from aelearn.metrics.rate_distortion import (
    RatePoint,
    SupervisedRatePoint,
    data_entropy,
    rate_distortion,
    rate_distortion_supervised,
    rate_distortion_sweep,
)
from aelearn.models import MODELS, VAE, VIB, build_model, gaussian_kl
from aelearn.train import TrainConfig, load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(seed: int = 0, latent_dim: int = 2) -> VAE:
    torch.manual_seed(seed)
    return VAE((1, 4, 4), latent_dim, architecture="mlp", mlp_hidden=(8,))


def images(n: int = 30, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


class Stripes(FactorDataset):
    """Factors (row 0..2, phase 0..3) drawing a bright row whose grey level repeats every 2 phases:
    12 grid points, 6 distinct images, each twice."""

    factor_names = ("row", "phase")
    factor_sizes = (3, 4)
    observation_shape = (1, 3, 2)

    def __init__(self, grey: bool = True):
        self.grey = grey

    def images_from_factors(self, factors):
        out = torch.zeros(len(factors), 1, 3, 2)
        level = (0.25 + 0.5 * (factors[:, 1] % 2)) if self.grey else (factors[:, 1] % 2).float()
        out[torch.arange(len(factors)), 0, factors[:, 0], 0] = level
        out[torch.arange(len(factors)), 0, factors[:, 0], 1] = 1.0
        return out


# ---------------------------------------------------------------------------------------------
# rate_distortion
# ---------------------------------------------------------------------------------------------


def test_rate_distortion_matches_a_direct_evaluation_with_the_same_codes():
    model, x = tiny_vae(), images(30)
    point = rate_distortion(model, x, batch_size=30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
        distortion = model.likelihood.nll(model.decoder(z), x).double().mean()
        rate = gaussian_kl(mu, logvar).double().mean()
    assert isinstance(point, RatePoint) and all(isinstance(v, float) for v in point)
    assert point.rate == pytest.approx(float(rate), rel=1e-6)
    assert point.distortion == pytest.approx(float(distortion), rel=1e-6)


def test_rate_distortion_on_a_subset_of_a_factor_dataset_is_reproducible():
    model = VAE(Stripes.observation_shape, 2, architecture="mlp", mlp_hidden=(8,))
    first = rate_distortion(model, Stripes(), num_examples=5, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert first == rate_distortion(model, Stripes(), num_examples=5, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert first.rate > 0 and first.distortion > 0


def test_rate_distortion_bad_input():
    model, x = tiny_vae(), images(4)
    with pytest.raises(TypeError, match="decoder"):
        rate_distortion(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="num_examples"):
        rate_distortion(model, x, num_examples=5)
    with pytest.raises(ValueError, match="empty"):
        rate_distortion(model, x[:0])
    with pytest.raises(TypeError, match="dataset"):
        rate_distortion(model, 42)
    with pytest.raises(ValueError, match=r"dataset: images must be \[N, C, H, W\]"):
        rate_distortion(model, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="NaN"):
        rate_distortion(model, torch.full_like(x, math.nan))
    with pytest.raises(TypeError, match="VIB"):
        rate_distortion_supervised(model, x)


# ---------------------------------------------------------------------------------------------
# The VIB model and the supervised variant
# ---------------------------------------------------------------------------------------------


def labelled(n: int = 40, seed: int = 0) -> TensorImages:
    """Images whose class (0..3) is the quadrant of their brightest pixel; a few labels unknown."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(4, (n,), generator=g)
    x = 0.1 * torch.rand(n, 1, 4, 4, generator=g)
    x[torch.arange(n), 0, 2 * (classes // 2), 2 * (classes % 2)] = 1.0
    labels = classes.clone()
    labels[:3] = -1
    return TensorImages(x, labels)


def test_vib_is_registered_and_trains_on_labels():
    assert MODELS["vib"] is VIB
    model = build_model("vib", (1, 4, 4), latent_dim=3, num_classes=4, beta=1e-3, mlp_hidden=[16])
    data = labelled()
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data))))
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    first = model.loss(batch, step=0)
    assert set(first) == {"loss", "class_nll", "rate", "beta", "accuracy"}
    assert all(value.dim() == 0 for value in first.values())
    for step in range(60):
        terms = model.loss(batch, step=step)
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
    assert float(terms["class_nll"].detach()) < 0.5 * float(first["class_nll"].detach())
    assert model.predict(batch[0]).shape == (40,)
    # The unlabelled examples (-1) are out of the cross-entropy and of the class distortion.
    point = rate_distortion_supervised(model, data, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert isinstance(point, SupervisedRatePoint) and point.class_distortion < 0.5 * float(first["class_nll"].detach())
    with torch.no_grad():
        mu, logvar = model.posterior(batch[0][3:])
    assert point.rate == pytest.approx(float(gaussian_kl(mu, logvar).double().mean()), rel=1e-5)


def test_vib_takes_its_class_from_a_factor():
    data = Stripes()
    model = VIB.for_dataset(data, label_factor="row", latent_dim=2, mlp_hidden=[8])
    assert model.num_classes == 3 and model.label_column == 0
    x, factors = data.sample(6, torch.Generator().manual_seed(0))
    assert torch.equal(model.targets(factors), factors[:, 0])
    assert set(model.loss((x, factors))) == {"loss", "class_nll", "rate", "beta", "accuracy"}
    by_index = VIB(data.observation_shape, 2, num_classes=4, label_factor=1, mlp_hidden=[8])
    assert torch.equal(by_index.targets(factors), factors[:, 1])
    point = rate_distortion_supervised(model, data, generator=torch.Generator().manual_seed(0))
    assert point.rate > 0 and point.class_distortion > 0
    assert rate_distortion_sweep([model], dataset=data, supervised=True, generator=torch.Generator().manual_seed(0)) == [point]


def test_vib_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        VIB((1, 4, 4), num_classes=1)
    with pytest.raises(ValueError, match="factor_names"):
        VIB((1, 4, 4), num_classes=3, label_factor="row")
    with pytest.raises(ValueError, match="factors"):
        VIB.for_dataset(labelled(), label_factor="row")
    with pytest.raises(ValueError, match="option"):
        build_model("vib", (1, 4, 4), decoder="mlp")
    model = VIB((1, 4, 4), 2, num_classes=4, mlp_hidden=[8])
    x = torch.rand(3, 1, 4, 4)
    with pytest.raises(ValueError, match="labelled"):
        model.loss(x)
    with pytest.raises(ValueError, match="label_factor"):
        model.loss((x, torch.zeros(3, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.loss((x, torch.tensor([0, 1, 4])))


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------


def test_sweep_over_given_models_uses_the_same_noise_for_each():
    models, x = [tiny_vae(0), tiny_vae(1)], images(20)
    points = rate_distortion_sweep(models, dataset=x, generator=torch.Generator().manual_seed(3))
    assert points == [rate_distortion(m, x, generator=torch.Generator().manual_seed(3)) for m in models]
    assert rate_distortion_sweep(models[1], dataset=x, generator=torch.Generator().manual_seed(3)) == points[1:]
    with pytest.raises(ValueError, match="dataset"):
        rate_distortion_sweep(models)
    with pytest.raises(ValueError, match="betas"):
        rate_distortion_sweep(models, [1.0], dataset=x)


def test_sweep_trains_one_model_per_beta(tmp_path):
    path = tmp_path / "images.pt"
    torch.save(images(32), path)
    config = TrainConfig(
        model="beta_vae", model_options={"latent_dim": 2, "architecture": "mlp", "mlp_hidden": [8]},
        data="tensors", data_options={"images": str(path)}, run_dir=str(tmp_path / "sweep"), steps=3,
        batch_size=8, lr=1e-2, checkpoint_every=0, image_every=0, progress=False, tensorboard="off", device="cpu",
    )
    points = rate_distortion_sweep(config.to_dict(), [0.5, 4.0], num_examples=16, generator=torch.Generator().manual_seed(0))
    assert len(points) == 2 and all(isinstance(p, RatePoint) for p in points)
    for beta in (0.5, 4.0):
        run_config, model, _, step = load_run(tmp_path / "sweep" / f"beta-{beta:g}")
        assert run_config.model_options["beta"] == beta and step == 3
    with pytest.raises(ValueError, match="betas"):
        rate_distortion_sweep(config)
    with pytest.raises(TypeError, match="config_or_models"):
        rate_distortion_sweep(42, [1.0])


# ---------------------------------------------------------------------------------------------
# data_entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grey", [True, False], ids=["grey", "binary"])
@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_data_entropy_counts_duplicate_images(grey, chunk_size):
    # 12 grid points, 6 distinct images of multiplicity 2: H = log 12 − (6 · 2 log 2) / 12 = log 6.
    assert data_entropy(Stripes(grey), chunk_size=chunk_size) == pytest.approx(math.log(6), rel=1e-12)


def test_data_entropy_bad_input():
    with pytest.raises(TypeError, match="FactorDataset"):
        data_entropy(images(4))
    with pytest.raises(ValueError, match="chunk_size"):
        data_entropy(Stripes(), chunk_size=0)
