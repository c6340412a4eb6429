"""ELBO decomposition over a whole dataset (aelearn.metrics.decomposition): float64 brute force,
the identity MI + TC + dim-KL = E[log q(z|x) − log p(z)], closed forms, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aelearn.metrics.decomposition import ElboDecomposition, aggregate_log_density, elbo_decomposition
from aelearn.models import VAE
from aelearn.models.likelihoods import Gaussian
from aelearn.ops import _registry

pytestmark = pytest.mark.usefixtures("one_thread")


class PosteriorFromImage(nn.Module):
    """A model whose "images" ``[N, 1, 1, 2D]`` hold the posterior (mu, logvar) itself: any set of
    posteriors becomes a dataset. Linear-Gaussian decoder onto the same 2D pixels."""

    def __init__(self, dim: int, dtype=torch.float64):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(dim, 2 * dim), nn.Unflatten(1, (1, 1, 2 * dim))).to(dtype)
        self.likelihood = Gaussian(0.5)

    def posterior(self, x):
        return x.flatten(1).chunk(2, dim=1)


def as_images(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return torch.cat([mu, logvar], 1)[:, None, None, :]


def brute_force(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """log q(z_i) and log q(z_ij) from the full [M, N, D] float64 log-density tensor."""
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    log_density = -0.5 * (math.log(2 * math.pi) + logvar[None] + (z[:, None] - mu[None]) ** 2 * torch.exp(-logvar[None]))
    log_n = math.log(len(mu))
    return torch.logsumexp(log_density.sum(2), 1) - log_n, torch.logsumexp(log_density, 1) - log_n


def random_posteriors(n: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=dtype), (0.5 * torch.randn(n, dim, generator=g, dtype=dtype) - 1.0)


def cpu_backends() -> list[str]:
    return [name for name in _registry.available("log_qz", "cpu") if name != "triton"]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("num_codes, num_posteriors, chunk", [(50, 50, 7), (13, 61, 16), (61, 13, 4), (5, 1, 3), (40, 37, 64)])
def test_aggregate_log_density_matches_brute_force(backend, num_codes, num_posteriors, chunk):
    mu, logvar = random_posteriors(num_posteriors, 3, seed=num_posteriors)
    z = torch.randn(num_codes, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    joint, marginals = aggregate_log_density(z, mu, logvar, chunk_size=chunk, backend=backend)
    want_joint, want_marginals = brute_force(z, mu, logvar)
    assert joint.dtype == torch.float64 and joint.shape == (num_codes,) and marginals.shape == (num_codes, 3)
    torch.testing.assert_close(joint, want_joint, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(marginals, want_marginals, rtol=1e-11, atol=1e-11)
    # float32 inputs: within ~1e-6 relative of the float64 values.
    joint32, marginals32 = aggregate_log_density(z.float(), mu.float(), logvar.float(), chunk_size=chunk, backend=backend)
    torch.testing.assert_close(joint32, want_joint, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(marginals32, want_marginals, rtol=2e-6, atol=2e-5)


def test_elbo_decomposition_matches_brute_force_with_the_same_codes():
    n, dim, m = 60, 3, 23
    mu, logvar = random_posteriors(n, dim, seed=3)
    model = PosteriorFromImage(dim)
    result = elbo_decomposition(model, as_images(mu, logvar), num_samples=m, batch_size=n, chunk_size=9, generator=torch.Generator().manual_seed(5))
    # The codes, drawn as documented: the subset, then one noise draw per batch in dataset order.
    g = torch.Generator().manual_seed(5)
    subset = torch.randperm(n, generator=g)[:m].sort().values
    z = mu[subset] + torch.exp(0.5 * logvar[subset]) * torch.randn(m, dim, generator=g, dtype=torch.float64)
    log_qz, log_qzj = brute_force(z, mu, logvar)
    log_q_given_x = (-0.5 * (math.log(2 * math.pi) + logvar[subset] + (z - mu[subset]) ** 2 / logvar[subset].exp())).sum(1)
    log_prior = (-0.5 * (math.log(2 * math.pi) + z**2)).sum(1)
    assert isinstance(result, ElboDecomposition) and result.num_samples == m and result.dataset_size == n
    assert result.mutual_information == pytest.approx(float((log_q_given_x - log_qz).mean()), rel=1e-10)
    assert result.total_correlation == pytest.approx(float((log_qz - log_qzj.sum(1)).mean()), rel=1e-10)
    assert result.dimensionwise_kl == pytest.approx(float((log_qzj.sum(1) - log_prior).mean()), rel=1e-10)
    with torch.no_grad():
        nll = model.likelihood.nll(model.decoder(z), as_images(mu, logvar)[subset])
    assert result.reconstruction == pytest.approx(float(nll.mean()), rel=1e-10)
    assert all(isinstance(value, (float, int)) for value in result)


def test_identity_holds_on_a_float32_vae():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(300, 1, 6, 6, generator=g)
    torch.manual_seed(0)
    model = VAE((1, 6, 6), 4, architecture="mlp", mlp_hidden=(32,))
    result = elbo_decomposition(model, images, batch_size=64, chunk_size=128, generator=torch.Generator().manual_seed(1))
    assert result.num_samples == 300
    parts = result.mutual_information + result.total_correlation + result.dimensionwise_kl
    assert result.kl_sum == pytest.approx(parts, abs=1e-12)
    assert abs(result.kl_sum - result.sampled_kl) < 1e-4
    assert 0 <= result.mutual_information <= math.log(300) + 1e-4
    assert model.training, "the model's mode is restored"


def test_same_seed_same_result_and_dataset_kinds():
    mu, logvar = random_posteriors(40, 2, seed=4)
    images = as_images(mu, logvar).float()
    model = PosteriorFromImage(2, torch.float32)
    first = elbo_decomposition(model, images, num_samples=20, batch_size=7, generator=torch.Generator().manual_seed(2))
    again = elbo_decomposition(
        model, torch.utils.data.TensorDataset(images), num_samples=20, batch_size=7, generator=torch.Generator().manual_seed(2)
    )
    assert first == again


def test_one_datapoint_has_no_mutual_information_nor_total_correlation():
    mu, logvar = random_posteriors(1, 3, seed=5)
    result = elbo_decomposition(PosteriorFromImage(3), as_images(mu, logvar), generator=torch.Generator().manual_seed(0))
    assert abs(result.mutual_information) < 1e-12
    assert abs(result.total_correlation) < 1e-12
    assert result.dimensionwise_kl == pytest.approx(result.sampled_kl, abs=1e-12)


def test_identical_posteriors_give_the_analytic_kl_as_dimensionwise_kl():
    # q(z) = q(z|x) = N(m, s²): MI = TC = 0 per sample; the sample KL estimate matches the closed form
    # within its Monte Carlo error (standard error about 0.006 here).
    n = 4000
    mu = torch.tensor([[0.3, -0.2]], dtype=torch.float64).expand(n, 2)
    logvar = torch.tensor([[-0.2, 0.1]], dtype=torch.float64).expand(n, 2)
    result = elbo_decomposition(PosteriorFromImage(2), as_images(mu, logvar), chunk_size=1024, generator=torch.Generator().manual_seed(0))
    assert abs(result.mutual_information) < 1e-9
    assert abs(result.total_correlation) < 1e-9
    analytic = float(0.5 * (mu[0] ** 2 + logvar[0].exp() - 1 - logvar[0]).sum())
    assert result.analytic_kl == pytest.approx(analytic, rel=1e-12)
    assert result.dimensionwise_kl == pytest.approx(analytic, abs=0.03)


def test_posteriors_on_a_product_grid_have_no_total_correlation():
    # Means on a grid {a_i} × {b_j} with one variance per dimension: q(z) = q(z_1) q(z_2) exactly.
    a, b = torch.linspace(-2, 2, 5, dtype=torch.float64), torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    mu = torch.cartesian_prod(a, b)
    logvar = torch.tensor([[-1.0, -2.0]], dtype=torch.float64).expand(len(mu), 2)
    result = elbo_decomposition(PosteriorFromImage(2), as_images(mu, logvar), chunk_size=4, generator=torch.Generator().manual_seed(0))
    assert abs(result.total_correlation) < 1e-12


def test_well_separated_posteriors_carry_log_n_nats():
    # Four narrow posteriors far apart: the code identifies the example, MI = log 4.
    mu = torch.tensor([[-30.0], [-10.0], [10.0], [30.0]], dtype=torch.float64)
    logvar = torch.full((4, 1), -4.0, dtype=torch.float64)
    result = elbo_decomposition(PosteriorFromImage(1), as_images(mu, logvar), generator=torch.Generator().manual_seed(0))
    assert result.mutual_information == pytest.approx(math.log(4), abs=1e-9)
    assert abs(result.total_correlation) < 1e-12  # one dimension


def test_aggregate_log_density_bad_input():
    mu, logvar = random_posteriors(4, 2, seed=7)
    with pytest.raises(ValueError, match="logvar"):
        aggregate_log_density(mu, mu, logvar[:, :1])
    with pytest.raises(TypeError, match="logvar"):
        aggregate_log_density(mu, mu, logvar.float())
    with pytest.raises(ValueError, match="z contains NaN"):
        aggregate_log_density(torch.full_like(mu, math.nan), mu, logvar)
    with pytest.raises(ValueError, match="M, N"):
        aggregate_log_density(mu[:0], mu, logvar)


def test_bad_input():
    mu, logvar = random_posteriors(10, 2, seed=6)
    images, model = as_images(mu, logvar), PosteriorFromImage(2)
    with pytest.raises(TypeError, match="posterior"):
        elbo_decomposition(nn.Linear(2, 2), images)
    with pytest.raises(ValueError, match="num_samples"):
        elbo_decomposition(model, images, num_samples=11)
    with pytest.raises(ValueError, match="num_samples"):
        elbo_decomposition(model, images, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        elbo_decomposition(model, images, chunk_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        elbo_decomposition(model, images, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        elbo_decomposition(model, images[:0])
    with pytest.raises(ValueError, match="NaN"):
        elbo_decomposition(model, torch.cat([images, torch.full_like(images[:1], math.nan)]))
    with pytest.raises(ValueError, match="shape"):
        elbo_decomposition(model, images.flatten(1))
    with pytest.raises(ValueError, match="backend"):
        elbo_decomposition(model, images, backend="fastest")
    with pytest.raises(TypeError, match="generator"):
        elbo_decomposition(model, images, num_samples=3, generator=0)
