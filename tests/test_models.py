"""Models: networks of every architecture, likelihoods against torch.distributions, the VAE and
β-VAE objectives (with scheduled weights), the model registry, and the schedules themselves."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from aelearn.models import (
    VAE,
    Bernoulli,
    BetaVAE,
    MODELS,
    Gaussian,
    build_model,
    build_networks,
    gaussian_kl,
    loss_key,
    split_batch,
)
from aelearn.schedules import Constant, Cosine, Cyclical, Linear, Piecewise, build_schedule


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "architecture, shape",
    [("conv64", (1, 64, 64)), ("conv64", (3, 64, 64)), ("conv28", (1, 28, 28)), ("mlp", (3, 5, 7))],
)
def test_networks_map_images_to_codes_and_back(architecture, shape):
    encoder, decoder = build_networks(architecture, shape, latent_dim=6, encoder_outputs=12, mlp_hidden=(16,))
    x = torch.rand(3, *shape)
    assert encoder(x).shape == (3, 12)
    assert decoder(torch.randn(3, 6)).shape == (3, *shape)


def test_conv64_is_the_disentanglement_lib_architecture():
    encoder, decoder = build_networks("conv64", (1, 64, 64), latent_dim=10, encoder_outputs=20)
    convolutions = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convolutions] == [(32, (4, 4), (2, 2)), (32, (4, 4), (2, 2)), (64, (4, 4), (2, 2)), (64, (4, 4), (2, 2))]
    linears = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024, 256), (256, 20)]
    transposed = [m for m in decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in transposed] == [64, 32, 32, 1]
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10, 256), (256, 1024)]


def test_auto_architecture_and_shape_errors():
    assert any(isinstance(m, torch.nn.Conv2d) for m in build_networks("auto", (1, 64, 64), 4, 8)[0].modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in build_networks("auto", (1, 28, 28), 4, 8)[0].modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in build_networks("auto", (1, 32, 32), 4, 8, mlp_hidden=(8,))[0].modules())
    with pytest.raises(ValueError, match="conv64.*64×64"):
        build_networks("conv64", (1, 28, 28), 4, 8)
    with pytest.raises(ValueError, match="valid architectures"):
        build_networks("resnet", (1, 64, 64), 4, 8)
    with pytest.raises(ValueError, match="observation_shape"):
        build_networks("mlp", (64, 64), 4, 8)


def test_bernoulli_and_gaussian_likelihoods_match_torch_distributions():
    torch.manual_seed(0)
    x = (torch.rand(4, 1, 3, 3) > 0.5).float()
    logits = torch.randn(4, 1, 3, 3)
    want = -D.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli().nll(logits, x), want)
    torch.testing.assert_close(Bernoulli().mean(logits), torch.sigmoid(logits))
    x, mean = torch.rand(4, 2, 3, 3), torch.rand(4, 2, 3, 3)
    want = -D.Normal(mean, 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Gaussian(0.3).nll(mean, x), want)
    learned = Gaussian(0.3, learn_sigma=True)
    assert [n for n, _ in learned.named_parameters()] == ["log_sigma"]
    torch.testing.assert_close(learned.nll(mean, x), want)
    with pytest.raises(ValueError, match="sigma"):
        Gaussian(0.0)


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    posterior = D.Normal(mu, torch.exp(0.5 * logvar))
    want = D.kl_divergence(posterior, D.Normal(torch.zeros(5, 3), torch.ones(5, 3))).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), want)


def _loss_with_noise(model, x, seed, step=0):
    torch.manual_seed(seed)
    return model.loss(x, step=step)


def test_vae_loss_is_the_negative_elbo_and_every_parameter_learns():
    model = VAE((1, 6, 6), 3, mlp_hidden=(8,))
    x = torch.rand(5, 1, 6, 6)
    terms = _loss_with_noise(model, x, 0)
    assert set(terms) == {"loss", "reconstruction", "kl"} and all(t.dim() == 0 for t in terms.values())
    torch.testing.assert_close(terms["loss"], terms["reconstruction"] + terms["kl"])
    # The reconstruction term by hand, with the same noise.
    torch.manual_seed(0)
    mu, logvar = model.posterior(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    torch.testing.assert_close(terms["reconstruction"], Bernoulli().nll(model.decoder(z), x).mean())
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_encode_decode_reconstruct_sample():
    model = VAE((1, 28, 28), 4).eval()
    x = torch.rand(2, 1, 28, 28)
    assert model.encode(x).shape == (2, 4)
    assert torch.equal(model.encode(x), model.posterior(x)[0])
    out = model.decode(torch.randn(2, 4))
    assert out.shape == (2, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    assert model.reconstruct(x).shape == x.shape
    first = model.sample(3, generator=torch.Generator().manual_seed(5))
    assert first.shape == (3, 1, 28, 28)
    assert torch.equal(first, model.sample(3, generator=torch.Generator().manual_seed(5)))
    gaussian = VAE((1, 28, 28), 4, likelihood="gaussian", architecture="mlp", mlp_hidden=(8,))
    assert gaussian.sample(2).shape == (2, 1, 28, 28)


def test_batches_with_labels_are_accepted():
    model = VAE((1, 4, 4), 2, mlp_hidden=(8,))
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, -1, 2])
    torch.testing.assert_close(_loss_with_noise(model, (x, y), 3)["loss"], _loss_with_noise(model, x, 3)["loss"])
    assert split_batch([x]) == (x, None)
    assert split_batch((x, y))[1] is y
    with pytest.raises(TypeError, match="batch"):
        split_batch({"x": x})
    assert loss_key("main") == "loss" and loss_key("discriminator") == "loss/discriminator"


def test_beta_vae_weights_kl_by_a_scheduled_beta():
    model = BetaVAE((1, 4, 4), 2, beta={"kind": "linear", "start": 0.0, "end": 4.0, "steps": 10}, mlp_hidden=(8,))
    x = torch.rand(3, 1, 4, 4)
    for step, beta in ((0, 0.0), (5, 2.0), (10, 4.0), (50, 4.0)):
        terms = _loss_with_noise(model, x, 7, step)
        assert float(terms["beta"]) == beta
        torch.testing.assert_close(terms["loss"], terms["reconstruction"] + beta * terms["kl"])


def test_beta_vae_with_capacity_penalises_the_distance_to_it():
    model = BetaVAE((1, 4, 4), 2, capacity={"kind": "linear", "start": 0.0, "end": 25.0, "steps": 100}, gamma=100.0, mlp_hidden=(8,))
    x = torch.rand(3, 1, 4, 4)
    terms = _loss_with_noise(model, x, 2, step=40)
    assert float(terms["capacity"]) == 10.0 and "beta" not in terms
    torch.testing.assert_close(terms["loss"], terms["reconstruction"] + 100.0 * (terms["kl"] - 10.0).abs())


def test_build_model_from_options_and_its_errors():
    model = build_model("beta_vae", (1, 64, 64), latent_dim=5, beta=8.0, likelihood="gaussian", sigma=0.2)
    assert isinstance(model, BetaVAE) and model.latent_dim == 5 and model.beta(0) == 8.0
    assert isinstance(build_model("vae", [1, 28, 28]), VAE)
    with pytest.raises(ValueError, match=f"unknown model 'wae'; valid models: {', '.join(sorted(MODELS))}"):
        build_model("wae", (1, 64, 64))
    with pytest.raises(ValueError, match="unknown option 'betta'.*valid options: latent_dim, beta, capacity"):
        build_model("beta_vae", (1, 64, 64), betta=4.0)
    with pytest.raises(ValueError, match="latent_dim"):
        build_model("vae", (1, 64, 64), latent_dim=0)
    with pytest.raises(ValueError, match="valid likelihoods"):
        build_model("vae", (1, 64, 64), likelihood="poisson")
    with pytest.raises(ValueError, match="beta: unknown schedule kind"):
        build_model("beta_vae", (1, 64, 64), beta={"kind": "sawtooth"})


def test_schedules():
    assert Constant(2.5)(10**9) == 2.5
    linear = Linear(0.0, 1.0, steps=10, begin=5)
    assert [linear(s) for s in (0, 5, 10, 15, 100)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cosine = Cosine(1.0, 0.0, steps=4)
    assert [round(cosine(s), 12) for s in (0, 2, 4, 9)] == [1.0, 0.5, 0.0, 0.0]
    cyclical = Cyclical(0.0, 1.0, period=10, ratio=0.5, cycles=2)
    assert [cyclical(s) for s in (0, 1, 5, 9, 10, 12, 19, 20, 25)] == [0.0, 0.2, 1.0, 1.0, 0.0, 0.4, 1.0, 1.0, 1.0]
    piecewise = Piecewise((1.0, 0.1, 0.01), (10, 20))
    assert [piecewise(s) for s in (0, 9, 10, 19, 20, 10**6)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_schedule_specs():
    assert build_schedule(3) == Constant(3.0)
    assert build_schedule("constant") == Constant(1.0)
    assert build_schedule("cosine", default_steps=100) == Cosine(1.0, 0.0, 100)
    assert build_schedule({"kind": "linear", "start": 0, "end": 1}, default_steps=7) == Linear(0.0, 1.0, 7)
    assert build_schedule({"kind": "piecewise", "values": [1, 0.5], "boundaries": [3]})(3) == 0.5
    for spec, message in [
        (True, "must be a number"),
        ({"kind": "linear", "start": 0, "end": 1}, "needs steps"),
        ({"kind": "linear", "start": 0, "end": 1, "steps": 5, "slope": 1}, "unknown parameter 'slope'.*valid parameters: start, end, steps, begin"),
        ({"kind": "linear", "start": 0, "end": 1, "steps": 0}, "steps must be an int ≥ 1"),
        ({"kind": "cosine", "start": math.nan, "end": 1, "steps": 2}, "start must be a finite number"),
        ({"kind": "cyclical", "start": 0, "end": 1, "period": 4, "ratio": 1.5}, "ratio"),
        ({"kind": "piecewise", "values": [1], "boundaries": [3]}, "one value more"),
        ({"kind": "piecewise", "values": [1, 2, 3], "boundaries": [5, 3]}, "increasing"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_schedule(spec, name="beta")
