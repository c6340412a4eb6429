"""MMD²: every backend against a float64 evaluation of the reference, closed forms, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from harness import INTERPRETED_MAX_SAMPLES, backend_params, interpreted, tolerance
from hypothesis import given, settings
from hypothesis import strategies as st

from aelearn.losses import MMDLoss, mmd_to_prior
from aelearn.ops import median_heuristic, mmd
from aelearn.ops.mmd import estimator_coefficients

# (n, m, d): edge sizes, primes, n != m, one case larger than any backend's tile.
SHAPES = [(2, 2, 1), (3, 2, 7), (41, 97, 5), (17, 17, 64), (300, 257, 33)]
KERNELS = {
    "rbf": lambda x, y: [s * math.sqrt(median_heuristic(x, y)) for s in (0.5, 1.0, 2.0, 4.0)],
    "imq": lambda x, y: [s * median_heuristic(x, y) for s in (0.2, 1.0)],
    "linear": lambda x, y: None,
}
GRAD_OUTPUT = 0.37


def samples(n: int, m: int, d: int, dtype: torch.dtype, device: str, seed: int = 0, noncontiguous: bool = False):
    """x ~ N(0, I), y ~ N(0.3, 1.2² I), both offset by 5 so that centring matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 5.0
    y = 1.2 * torch.randn(m, d, generator=g, dtype=torch.float64) + 5.3
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    if noncontiguous:
        x = x.T.contiguous().T
        assert not x.is_contiguous()
    return x, y


def value_and_grads(x, y, **kwargs):
    x = x.detach().requires_grad_(True)
    y = y.detach().requires_grad_(True)
    value = mmd(x, y, **kwargs)
    gx, gy = torch.autograd.grad(value * GRAD_OUTPUT, (x, y))
    return value.detach(), gx, gy


@pytest.mark.parametrize("backend_device", backend_params("mmd"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}-m{s[1]}-d{s[2]}")
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_matches_float64_reference(backend_device, dtype, shape, kernel, estimator):
    backend, device = backend_device
    n, m, d = shape
    if interpreted(backend, device) and max(n, m) > INTERPRETED_MAX_SAMPLES:
        pytest.skip("the Triton interpreter gets the small shapes only")
    x, y = samples(n, m, d, dtype, device, noncontiguous=(n == 41))
    bandwidths = KERNELS[kernel](x, y)
    value, gx, gy = value_and_grads(x, y, kernel=kernel, bandwidths=bandwidths, estimator=estimator, backend=backend)
    ref, rgx, rgy = value_and_grads(
        x.double(), y.double(), kernel=kernel, bandwidths=bandwidths, estimator=estimator, backend="reference"
    )
    assert value.dtype == dtype and value.dim() == 0
    atol, rtol = tolerance("mmd", backend, dtype)
    torch.testing.assert_close(value.double(), ref, atol=atol, rtol=rtol)
    # Gradients within 1e-4 (float32) of the largest float64 gradient entry.
    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-9
    for got, want in ((gx, rgx), (gy, rgy)):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=grad_rtol * float(want.abs().max()), rtol=grad_rtol)


@pytest.mark.parametrize("backend_device", backend_params("mmd"))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradcheck_float64(backend_device, kernel):
    backend, device = backend_device
    x, y = samples(5, 4, 3, torch.float64, device)
    bandwidths = KERNELS[kernel](x, y)
    x.requires_grad_(True)
    y.requires_grad_(True)
    # nondet_tol: the cpp backward adds block contributions in schedule order (last-bit differences).
    assert torch.autograd.gradcheck(
        lambda a, b: mmd(a, b, kernel=kernel, bandwidths=bandwidths, backend=backend),
        (x, y),
        eps=1e-6,
        atol=1e-6,
        nondet_tol=1e-12,
    )


def test_reference_matches_elementwise_definition():
    """The materialising reference equals the defining double sums, written independently."""
    x, y = samples(6, 5, 3, torch.float64, "cpu")
    sigmas = [0.7, 2.0]

    def k(a, b):
        r = float(((a - b) ** 2).sum())
        return sum(math.exp(-r / (2 * s * s)) for s in sigmas)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    got = mmd(x, y, bandwidths=sigmas, backend="reference")
    assert float(got) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)


def test_rbf_population_value_closed_form():
    """The U-statistic is unbiased: its mean over replications is the Gaussian closed form.

    For P = N(0, I_d), Q = N(δ, I_d) and k = exp(−‖a−b‖²/(2σ²)), with a − b ~ N(μ, v·I_d):
    E k = (σ²/(σ²+v))^{d/2} · exp(−‖μ‖²/(2(σ²+v))), so MMD² = 2(σ²/(σ²+2))^{d/2}(1 − exp(−‖δ‖²/(2(σ²+2)))).
    """
    d, n, sigma, reps = 2, 64, 1.5, 400
    delta = torch.tensor([0.5, 0.0], dtype=torch.float64)
    s2 = sigma * sigma
    population = 2 * (s2 / (s2 + 2)) ** (d / 2) * (1 - math.exp(-float(delta @ delta) / (2 * (s2 + 2))))
    g = torch.Generator().manual_seed(1)
    estimates = torch.stack(
        [
            mmd(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64) + delta, bandwidths=sigma)
            for _ in range(reps)
        ]
    )
    standard_error = float(estimates.std()) / math.sqrt(reps)
    assert abs(float(estimates.mean()) - population) < 4 * standard_error


def test_linear_kernel_closed_forms():
    x, y = samples(13, 7, 4, torch.float64, "cpu")
    biased = mmd(x, y, kernel="linear", estimator="biased")
    assert float(biased) == pytest.approx(float((x.mean(0) - y.mean(0)).pow(2).sum()), rel=1e-12)
    sx, sy = x.sum(0), y.sum(0)
    n, m = len(x), len(y)
    unbiased = (sx @ sx - x.pow(2).sum()) / (n * (n - 1)) + (sy @ sy - y.pow(2).sum()) / (m * (m - 1)) - 2 * (sx @ sy) / (n * m)
    assert float(mmd(x, y, kernel="linear")) == pytest.approx(float(unbiased), rel=1e-10)


def test_biased_estimator_of_a_sample_with_itself_is_zero():
    x, _ = samples(20, 2, 3, torch.float64, "cpu")
    assert abs(float(mmd(x, x.clone(), estimator="biased", bandwidths=[1.0, 3.0]))) < 1e-14


def test_unbiased_estimate_is_returned_negative_when_it_is():
    g = torch.Generator().manual_seed(3)
    values = [float(mmd(torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), bandwidths=1.0)) for _ in range(20)]
    assert min(values) < 0


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 12),
    m=st.integers(2, 12),
    d=st.integers(1, 4),
    shift=st.floats(-50, 50),
    seed=st.integers(0, 2**16),
    kernel=st.sampled_from(list(KERNELS)),
)
def test_symmetry_and_invariances(n, m, d, shift, seed, kernel):
    x, y = samples(n, m, d, torch.float64, "cpu", seed=seed)
    bandwidths = KERNELS[kernel](x, y)
    value = float(mmd(x, y, kernel=kernel, bandwidths=bandwidths))
    scale = 1.0 + abs(value)
    swapped = float(mmd(y, x, kernel=kernel, bandwidths=bandwidths))
    shifted = float(mmd(x + shift, y + shift, kernel=kernel, bandwidths=bandwidths))
    permuted = float(mmd(x.flip(0), y.roll(1, 0), kernel=kernel, bandwidths=bandwidths))
    assert swapped == pytest.approx(value, abs=1e-10 * scale)
    assert shifted == pytest.approx(value, abs=1e-9 * scale)
    assert permuted == pytest.approx(value, abs=1e-10 * scale)


def test_median_heuristic_rule():
    x, y = samples(30, 20, 3, torch.float64, "cpu")
    pooled = torch.cat([x, y])
    r = torch.cdist(pooled, pooled).pow(2)
    pairs = r[torch.triu_indices(50, 50, 1).unbind()]
    assert median_heuristic(x, y) == pytest.approx(float(pairs.median()), rel=1e-10)
    # Beyond the subsample size the rule takes an evenly strided subsample: deterministic.
    big_x, big_y = samples(3000, 2000, 3, torch.float32, "cpu")
    assert median_heuristic(big_x, big_y) == median_heuristic(big_x, big_y)
    value = mmd(x, y)
    expected = mmd(x, y, bandwidths=math.sqrt(float(pairs.median())))
    assert float(value) == pytest.approx(float(expected), rel=1e-10)


def test_coefficients():
    assert estimator_coefficients(4, 5, True) == (1 / 12, 1 / 20, -2 / 20)
    assert estimator_coefficients(4, 5, False) == (1 / 16, 1 / 25, -2 / 20)


def test_loss_module_and_prior_penalty_train():
    """Drop-in use: MMD to the prior pulls shifted codes back towards N(0, I)."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(128, 3, generator=g) + 2.0).requires_grad_(True)
    optimiser = torch.optim.SGD([z], lr=50.0)
    first = None
    for _ in range(30):
        loss = mmd_to_prior(z, generator=g)
        first = first if first is not None else float(loss.detach())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(mmd_to_prior(z.detach(), generator=g)) < 0.2 * first
    loss = MMDLoss(kernel="imq", bandwidths=[1.0, 2.0], estimator="biased")
    x, y = samples(9, 8, 2, torch.float64, "cpu")
    assert float(loss(x, y)) == pytest.approx(float(mmd(x, y, kernel="imq", bandwidths=[1.0, 2.0], estimator="biased")))


# --- bad input -------------------------------------------------------------------------------

GOOD_X = torch.randn(5, 3)
GOOD_Y = torch.randn(4, 3)


@pytest.mark.parametrize(
    "x, y, kwargs, error, words",
    [
        (GOOD_X[0], GOOD_Y, {}, ValueError, "x must be a 2-D"),
        (GOOD_X, GOOD_Y[None], {}, ValueError, "y must be a 2-D"),
        (GOOD_X, torch.randn(4, 2), {}, ValueError, "same number of features"),
        (GOOD_X[:1], GOOD_Y, {}, ValueError, "x must have at least 2 samples"),
        (GOOD_X, GOOD_Y[:1], {}, ValueError, "y must have at least 2 samples"),
        (GOOD_X[:0], GOOD_Y, {"estimator": "biased"}, ValueError, "x must have at least 1 sample"),
        (torch.ones(5, 3, dtype=torch.int64), GOOD_Y, {}, TypeError, "x must be a floating-point"),
        (GOOD_X, GOOD_Y.double(), {}, TypeError, "same dtype"),
        (GOOD_X, GOOD_Y.to("meta"), {}, ValueError, "same device"),
        (GOOD_X, GOOD_Y, {"bandwidths": [1.0, 0.0]}, ValueError, "bandwidths must be positive"),
        (GOOD_X, GOOD_Y, {"bandwidths": -2.0}, ValueError, "bandwidths must be positive"),
        (GOOD_X, GOOD_Y, {"bandwidths": []}, ValueError, "bandwidths must not be empty"),
        (GOOD_X, GOOD_Y, {"bandwidths": "wide"}, TypeError, "bandwidths must be"),
        (GOOD_X, GOOD_Y, {"kernel": "linear", "bandwidths": 1.0}, ValueError, "bandwidths must be None"),
        (GOOD_X, GOOD_Y, {"kernel": "gauss"}, ValueError, "kernel must be one of"),
        (GOOD_X, GOOD_Y, {"estimator": "plugin"}, ValueError, "estimator must be one of"),
        (torch.tensor([[0.0, float("nan"), 1.0]] * 3), GOOD_Y, {}, ValueError, "x contains NaN or Inf"),
        (GOOD_X, torch.tensor([[0.0, float("inf"), 1.0]] * 3), {}, ValueError, "y contains NaN or Inf"),
        (torch.ones(4, 3), torch.ones(4, 3), {}, ValueError, "pass bandwidths explicitly"),
        ([[1.0]], GOOD_Y, {}, TypeError, "x must be a torch.Tensor"),
        (GOOD_X, GOOD_Y, {"backend": "fortran"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input(x, y, kwargs, error, words):
    with pytest.raises(error, match=words):
        mmd(x, y, **kwargs)


def test_prior_penalty_bad_input():
    with pytest.raises(ValueError, match="z must be a 2-D"):
        mmd_to_prior(torch.randn(4))
    with pytest.raises(ValueError, match="prior must be 'normal'"):
        mmd_to_prior(torch.randn(4, 2), prior="laplace")
