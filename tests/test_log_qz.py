"""log q(z) by MWS / MSS: every backend against float64, the published weights, closed forms, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from harness import INTERPRETED_MAX_SAMPLES, backend_params, interpreted, tolerance

from aelearn.losses import BetaTCLoss, TotalCorrelationLoss
from aelearn.ops import log_qz, tc_decomposition, total_correlation
from aelearn.ops.log_qz import gaussian_log_density, log_weights

# (B, D): a single sample, the smallest MSS batch, primes, one batch larger than any backend's tile.
SHAPES = [(1, 1), (3, 5), (7, 32), (41, 5), (300, 6)]
DATASET_SIZE = 1000


def posterior_samples(batch: int, dim: int, dtype, device, seed: int = 0, noncontiguous: bool = False):
    """mu ~ N(0, 1), logvar ~ U(−3, 1), z = mu + σ·ε: the self term dominates, others span decades."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    logvar = torch.rand(batch, dim, generator=g, dtype=torch.float64) * 4 - 3
    z = mu + torch.exp(0.5 * logvar) * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    z, mu, logvar = (t.to(device=device, dtype=dtype) for t in (z, mu, logvar))
    if noncontiguous:
        mu = mu.T.contiguous().T
    return z, mu, logvar


def group_cases(dim: int):
    cases = {"singletons": None, "one": [list(range(dim))]}
    if dim >= 5:
        cases["uneven"] = [[0, 1], [2], list(range(3, dim))]
        cases["permuted"] = [[dim - 1, 1], list(range(2, dim - 1)) + [0]]
    return cases


def outputs_and_grads(z, mu, logvar, seed=1, **kwargs):
    leaves = [t.detach().requires_grad_(True) for t in (z, mu, logvar)]
    joint, groups = log_qz(*leaves, **kwargs)
    g = torch.Generator().manual_seed(seed)
    upstream_joint = torch.randn(joint.shape, generator=g, dtype=torch.float64).to(joint)
    upstream_groups = torch.randn(groups.shape, generator=g, dtype=torch.float64).to(groups)
    grads = torch.autograd.grad((joint * upstream_joint).sum() + (groups * upstream_groups).sum(), leaves)
    return joint.detach(), groups.detach(), grads


@pytest.mark.parametrize("backend_device", backend_params("log_qz"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "shape, estimator",
    # MSS needs B >= 3.
    [(shape, estimator) for shape in SHAPES for estimator in ("mws", "mss") if estimator == "mws" or shape[0] >= 3],
    ids=lambda v: f"B{v[0]}-D{v[1]}" if isinstance(v, tuple) else v,
)
def test_matches_float64_reference(backend_device, dtype, shape, estimator):
    backend, device = backend_device
    batch, dim = shape
    if interpreted(backend, device) and batch > INTERPRETED_MAX_SAMPLES:
        pytest.skip("the Triton interpreter gets the small shapes only")
    z, mu, logvar = posterior_samples(batch, dim, dtype, device, noncontiguous=(batch == 41))
    atol, rtol = tolerance("log_qz", backend, dtype)
    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-9
    for name, groups in group_cases(dim).items():
        kwargs = dict(dataset_size=DATASET_SIZE, estimator=estimator, groups=groups)
        joint, marginals, grads = outputs_and_grads(z, mu, logvar, backend=backend, **kwargs)
        ref_joint, ref_marginals, ref_grads = outputs_and_grads(z.double(), mu.double(), logvar.double(), backend="reference", **kwargs)
        assert joint.dtype == dtype and joint.shape == (batch,), name
        torch.testing.assert_close(joint.double(), ref_joint, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(marginals.double(), ref_marginals, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        for got, want in zip(grads, ref_grads):
            assert got.dtype == dtype
            scale = float(want.abs().max())
            torch.testing.assert_close(got.double(), want, atol=grad_rtol * scale, rtol=grad_rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend_device", backend_params("log_qz"))
def test_only_one_output_used(backend_device):
    """Backward with a gradient for one output only (the other is None to autograd)."""
    backend, device = backend_device
    z, mu, logvar = posterior_samples(9, 4, torch.float64, device)
    leaves = [t.requires_grad_(True) for t in (z, mu, logvar)]
    joint, _ = log_qz(*leaves, dataset_size=50, backend=backend)
    got = torch.autograd.grad(joint.sum(), leaves)
    ref_joint, _ = log_qz(*leaves, dataset_size=50, backend="reference")
    want = torch.autograd.grad(ref_joint.sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend_device", backend_params("log_qz"))
@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_gradcheck_float64(backend_device, estimator):
    backend, device = backend_device
    z, mu, logvar = posterior_samples(5, 3, torch.float64, device)
    leaves = [t.requires_grad_(True) for t in (z, mu, logvar)]
    assert torch.autograd.gradcheck(
        lambda *t: log_qz(*t, dataset_size=20, estimator=estimator, groups=[[0, 2], [1]], backend=backend),
        leaves, eps=1e-6, atol=1e-6, nondet_tol=1e-12,
    )


def test_published_weights():
    """MWS: 1/(NB) everywhere (Chen et al. 2018, App. C.1). MSS (App. C.2): 1/N on the diagonal,
    (N−B+1)/(N(B−1)) at j = i + 1 wrapping to j = 0 in the last row, 1/(B−1) elsewhere; rows sum to 1."""
    n, b = 100, 6
    assert log_weights(b, n, "mws") == pytest.approx((-math.log(600),) * 3)
    w_self, w_next, w_other = (math.exp(w) for w in log_weights(b, n, "mss"))
    assert (w_self, w_next, w_other) == pytest.approx((1 / 100, 95 / 500, 1 / 5))
    assert w_self + w_next + (b - 2) * w_other == pytest.approx(1.0, rel=1e-14)


def test_reference_matches_explicit_sums():
    """The reference equals log Σ_j w_ij Π_d N(z_id; μ_jd, σ²_jd), written out in Python floats."""
    batch, dim, n = 5, 3, 40
    z, mu, logvar = posterior_samples(batch, dim, torch.float64, "cpu")
    groups = [[0, 2], [1]]
    w_self, w_next, w_other = (math.exp(w) for w in log_weights(batch, n, "mss"))

    def weight(i, j):
        return w_self if j == i else w_next if j == (i + 1) % batch else w_other

    def density(i, j, dims):
        return math.prod(
            math.exp(-0.5 * (z[i, d] - mu[j, d]) ** 2 / math.exp(logvar[j, d])) / math.sqrt(2 * math.pi * math.exp(logvar[j, d])) for d in dims
        )

    joint, marginals = log_qz(z, mu, logvar, dataset_size=n, estimator="mss", groups=groups, backend="reference")
    for i in range(batch):
        assert float(joint[i]) == pytest.approx(math.log(sum(weight(i, j) * density(i, j, range(dim)) for j in range(batch))), rel=1e-12)
        for g, dims in enumerate(groups):
            expected = math.log(sum(weight(i, j) * density(i, j, dims) for j in range(batch)))
            assert float(marginals[i, g]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("estimator, log_mass", [("mws", -math.log(DATASET_SIZE)), ("mss", 0.0)])
def test_identical_posteriors_closed_form(estimator, log_mass):
    """When every q(z|x_j) is the same Gaussian, log q(z_i) = log N(z_i; μ, σ²) + log Σ_j w_ij."""
    z, mu, logvar = posterior_samples(8, 4, torch.float64, "cpu")
    mu = mu[:1].expand_as(z)
    logvar = logvar[:1].expand_as(z)
    joint, marginals = log_qz(z, mu, logvar, dataset_size=DATASET_SIZE, estimator=estimator)
    per_dim = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))
    torch.testing.assert_close(joint, per_dim.sum(1) + log_mass, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(marginals, per_dim + log_mass, atol=1e-12, rtol=1e-12)


def test_decomposition_adds_up_to_the_kl_estimate():
    z, mu, logvar = posterior_samples(64, 6, torch.float64, "cpu")
    for estimator in ("mws", "mss"):
        terms = tc_decomposition(z, mu, logvar, dataset_size=DATASET_SIZE, estimator=estimator)
        kl = (gaussian_log_density(z, mu, logvar) - gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))).mean()
        total = terms.mutual_information + terms.total_correlation + terms.dimensionwise_kl
        assert float(total) == pytest.approx(float(kl), rel=1e-12)
        tc = total_correlation(z, mu, logvar, dataset_size=DATASET_SIZE, estimator=estimator)
        assert float(tc) == float(terms.total_correlation)
    # One latent dimension has no total correlation.
    one = tc_decomposition(z[:, :1], mu[:, :1], logvar[:, :1], dataset_size=DATASET_SIZE)
    assert abs(float(one.total_correlation)) < 1e-12


def test_total_correlation_detects_dependence():
    """Codes of a dataset whose latents are correlated have a clearly higher TC than independent ones."""
    g = torch.Generator().manual_seed(3)
    batch, dim = 512, 2
    logvar = torch.full((batch, dim), math.log(0.01), dtype=torch.float64)
    independent = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    shared = torch.randn(batch, 1, generator=g, dtype=torch.float64)
    correlated = torch.cat([shared, 0.95 * shared + 0.3 * torch.randn(batch, 1, generator=g, dtype=torch.float64)], 1)
    tc = {}
    for name, mu in (("independent", independent), ("correlated", correlated)):
        z = mu + 0.1 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
        tc[name] = float(total_correlation(z, mu, logvar, dataset_size=batch, estimator="mss"))
    # Gaussian TC of the correlated pair: −½ log(1 − ρ²) with ρ ≈ 0.95/√(0.95² + 0.09) ≈ 0.954.
    assert tc["correlated"] > tc["independent"] + 0.8


def test_losses():
    z, mu, logvar = posterior_samples(32, 4, torch.float64, "cpu")
    terms = tc_decomposition(z, mu, logvar, dataset_size=500, estimator="mss")
    loss = BetaTCLoss(500, alpha=1.0, beta=6.0, gamma=2.0, estimator="mss")
    expected = terms.mutual_information + 6.0 * terms.total_correlation + 2.0 * terms.dimensionwise_kl
    assert float(loss(z, mu, logvar)) == pytest.approx(float(expected), rel=1e-12)
    assert float(TotalCorrelationLoss(500, estimator="mss")(z, mu, logvar)) == pytest.approx(float(terms.total_correlation), rel=1e-12)


# --- bad input -------------------------------------------------------------------------------

Z = torch.randn(6, 3)
NAN_LOGVAR = torch.zeros(6, 3)
NAN_LOGVAR[2, 1] = float("nan")


@pytest.mark.parametrize(
    "args, kwargs, error, words",
    [
        ((Z, Z[:5], Z), {}, ValueError, "mu must have the shape of z"),
        ((Z, Z, Z[:, :2]), {}, ValueError, "logvar must have the shape of z"),
        ((Z[0], Z[0], Z[0]), {}, ValueError, "z must be a 2-D"),
        ((Z, Z, NAN_LOGVAR), {}, ValueError, "logvar contains NaN or Inf"),
        ((Z, Z.double(), Z), {}, TypeError, "mu must have the dtype of z"),
        ((Z.long(), Z, Z), {}, TypeError, "z must be a floating-point"),
        ((Z, Z, Z), {"dataset_size": 5}, ValueError, "dataset_size must be at least the batch size 6"),
        ((Z, Z, Z), {"dataset_size": 10.0}, TypeError, "dataset_size must be an int"),
        ((Z[:2], Z[:2], Z[:2]), {"estimator": "mss"}, ValueError, "mss estimator needs a batch of at least 3"),
        ((Z, Z, Z), {"estimator": "iwae"}, ValueError, "estimator must be one of"),
        ((Z, Z, Z), {"groups": [[0, 1], [1, 2]]}, ValueError, "groups overlap: dimension 1"),
        ((Z, Z, Z), {"groups": [[0, 1]]}, ValueError, r"missing \[2\]"),
        ((Z, Z, Z), {"groups": [[0, 1, 2, 3]]}, ValueError, "dimension 3, outside"),
        ((Z, Z, Z), {"groups": [[0, 1, 2], []]}, ValueError, r"groups\[1\] is empty"),
    ],
)
def test_bad_input(args, kwargs, error, words):
    kwargs = {"dataset_size": 100, **kwargs}
    with pytest.raises(error, match=words):
        log_qz(*args, **kwargs)


def test_bad_prior():
    with pytest.raises(ValueError, match="prior must be one of"):
        tc_decomposition(Z, Z, Z, dataset_size=10, prior="laplace")
