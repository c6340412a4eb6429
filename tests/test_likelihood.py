"""IWAE log-likelihood (aelearn.metrics.likelihood): a linear-Gaussian model with exact log p(x),
the exact posterior as proposal, K = 1 against the ELBO with the same noise, monotone in K, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aelearn.metrics.likelihood import log_likelihood
from aelearn.models import VAE
from aelearn.models.likelihoods import Gaussian

PIXELS, LATENTS, SIGMA = 6, 3, 0.5

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearGaussian(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(W z + b, σ² I) with W = Q diag(s) (orthonormal Q): the exact
    posterior is diagonal, N(v ⊙ s ⊙ Qᵀ(x − b) / σ², v) with v = σ² / (σ² + s²); p(x) = N(b, W Wᵀ + σ² I).
    ``shift`` / ``stretch`` move the proposal's mean and log-variance away from the exact posterior."""

    def __init__(self, shift: float = 0.0, stretch: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(PIXELS, LATENTS, generator=g, dtype=torch.float64))
        self.scales = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
        self.decoder = nn.Sequential(nn.Linear(LATENTS, PIXELS).double(), nn.Unflatten(1, (1, 1, PIXELS)))
        with torch.no_grad():
            self.decoder[0].weight.copy_(q * self.scales)
            self.decoder[0].bias.copy_(torch.randn(PIXELS, generator=g, dtype=torch.float64))
        self.likelihood = Gaussian(SIGMA)
        self.shift, self.stretch = shift, stretch

    def posterior(self, x):
        weight, bias = self.decoder[0].weight, self.decoder[0].bias
        variance = SIGMA**2 / (SIGMA**2 + self.scales**2)
        mu = variance * ((x.flatten(1) - bias) @ weight) / SIGMA**2
        return mu + self.shift, (variance.log() + self.stretch).expand_as(mu)

    @torch.no_grad()
    def exact_log_likelihood(self, x):
        weight, bias = self.decoder[0].weight, self.decoder[0].bias
        covariance = weight @ weight.T + SIGMA**2 * torch.eye(PIXELS, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(bias, covariance).log_prob(x.flatten(1))


def data(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 1, 1, PIXELS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_exact_posterior_gives_the_exact_log_likelihood_for_any_k():
    # aelearn's Gaussian likelihood computes −log p(x|z) in float32: hence rel=1e-7, not 1e-12.
    model, x = LinearGaussian(), data()
    exact = model.exact_log_likelihood(x)
    for k in (1, 7):
        result = log_likelihood(model, x, num_samples=k, batch_size=16, sample_batch=3, generator=torch.Generator().manual_seed(0))
        assert result["log_likelihood"] == pytest.approx(float(exact.mean()), rel=1e-7)
        assert result["std_error"] == pytest.approx(float(exact.std() / math.sqrt(len(x))), rel=1e-6)
        assert result["bits_per_dim"] == pytest.approx(-float(exact.mean()) / (PIXELS * math.log(2)), rel=1e-7)
        assert result["elbo"] == pytest.approx(float(exact.mean()), rel=1e-7)
        assert result["num_samples"] == k and result["num_examples"] == len(x)
        assert all(isinstance(value, float) for value in result.values())


def test_iwae_rises_with_k_towards_the_exact_value():
    model, x = LinearGaussian(shift=0.4, stretch=0.7), data()
    exact = float(model.exact_log_likelihood(x).mean())
    bounds = [
        log_likelihood(model, x, num_samples=k, sample_batch=50, generator=torch.Generator().manual_seed(k))["log_likelihood"]
        for k in (1, 10, 100, 1000)
    ]
    assert bounds == sorted(bounds)
    assert bounds[-1] < exact + 1e-3
    assert exact - bounds[-1] < 0.1 * (exact - bounds[0])


def test_k1_equals_the_elbo_with_the_same_noise():
    torch.manual_seed(0)
    model = VAE((1, 4, 4), 2, architecture="mlp", mlp_hidden=(16,), likelihood="gaussian", sigma=0.3)
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    result = log_likelihood(model, x, num_samples=1, batch_size=12, generator=torch.Generator().manual_seed(3))
    assert result["log_likelihood"] == result["elbo"]
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        noise = torch.randn(12, 1, 2, generator=torch.Generator().manual_seed(3))[:, 0]
        z = mu + torch.exp(0.5 * logvar) * noise
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(1)
        want = -model.likelihood.nll(model.decoder(z), x) + log_prior - log_q
    assert result["log_likelihood"] == pytest.approx(float(want.double().mean()), rel=1e-5)


def test_batching_does_not_change_the_estimate_and_subsets_are_reproducible():
    model, x = LinearGaussian(shift=0.3), data(20)
    one = log_likelihood(model, x, num_samples=6, batch_size=20, sample_batch=6, generator=torch.Generator().manual_seed(0))
    again = log_likelihood(model, torch.utils.data.TensorDataset(x), num_samples=6, batch_size=20, sample_batch=6, generator=torch.Generator().manual_seed(0))
    assert one == again
    subset = log_likelihood(model, x, num_samples=6, num_examples=5, generator=torch.Generator().manual_seed(4))
    assert subset == log_likelihood(model, x, num_samples=6, num_examples=5, generator=torch.Generator().manual_seed(4))
    assert subset["num_examples"] == 5


def test_bad_input():
    model, x = LinearGaussian(), data(5)
    with pytest.raises(TypeError, match="decoder"):
        log_likelihood(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, x, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        log_likelihood(model, x, num_samples=1.5)
    with pytest.raises(ValueError, match="sample_batch"):
        log_likelihood(model, x, sample_batch=0)
    with pytest.raises(ValueError, match="num_examples"):
        log_likelihood(model, x, num_examples=6)
    with pytest.raises(ValueError, match="empty"):
        log_likelihood(model, x[:0])
    with pytest.raises(ValueError, match="NaN"):
        log_likelihood(model, torch.cat([x, torch.full_like(x[:1], math.nan)]))
