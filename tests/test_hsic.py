"""HSIC: every backend against a float64 evaluation of the reference, closed forms, groups, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from harness import INTERPRETED_MAX_SAMPLES, backend_params, interpreted, tolerance
from hypothesis import given, settings
from hypothesis import strategies as st

from aelearn.losses import HSICLoss
from aelearn.ops import hsic, hsic_groups
from aelearn.ops._kernels import median_sq_distance

# (n, p, q): the smallest n of the unbiased estimator, p != q, one case larger than any backend's tile.
SHAPES = [(4, 1, 3), (5, 3, 7), (37, 16, 16), (300, 5, 4)]
# (kernel_x, kernel_y, bandwidths as multiples of each sample's median scale, or None).
KERNEL_PAIRS = [
    ("rbf", "rbf", (0.5, 1.0, 2.0), (1.0,)),
    ("imq", "linear", (0.3, 1.0), None),
    ("linear", "imq", None, (1.0,)),
    ("rbf", "delta", (1.0,), None),
    ("linear", "delta", None, None),
]
GRAD_OUTPUT = 0.41


def paired(n: int, p: int, q: int, dtype, device, kernel_y: str = "rbf", seed: int = 0, noncontiguous: bool = False):
    """Dependent pairs: y (or the label) is a noisy function of x; both offset so that centring matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    if kernel_y == "delta":
        y = (x[:, 0] > 0).long() + (x[:, -1] > 0.5).long() + torch.randint(0, 2, (n,), generator=g)
        return (x + 4.0).to(device=device, dtype=dtype), y.to(device)
    y = torch.tanh(x.sum(1, keepdim=True)) * torch.ones(1, q, dtype=torch.float64) + 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    x, y = (x + 4.0).to(device=device, dtype=dtype), (y - 3.0).to(device=device, dtype=dtype)
    if noncontiguous:
        x = x.T.contiguous().T
    return x, y


def scales(kernel: str, multiples, sample: torch.Tensor):
    if multiples is None:
        return None
    median = median_sq_distance(sample)
    return [m * (math.sqrt(median) if kernel == "rbf" else median) for m in multiples]


def value_and_grads(x, y, **kwargs):
    x = x.detach().requires_grad_(True)
    labels = not y.is_floating_point()
    y = y.detach() if labels else y.detach().requires_grad_(True)
    value = hsic(x, y, **kwargs)
    grads = torch.autograd.grad(value * GRAD_OUTPUT, (x,) if labels else (x, y))
    return value.detach(), grads


@pytest.mark.parametrize("backend_device", backend_params("hsic"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}-p{s[1]}-q{s[2]}")
@pytest.mark.parametrize("kernels", KERNEL_PAIRS, ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_matches_float64_reference(backend_device, dtype, shape, kernels, estimator):
    backend, device = backend_device
    n, p, q = shape
    if interpreted(backend, device) and n > INTERPRETED_MAX_SAMPLES:
        pytest.skip("the Triton interpreter gets the small shapes only")
    kernel_x, kernel_y, mult_x, mult_y = kernels
    x, y = paired(n, p, q, dtype, device, kernel_y, noncontiguous=(n == 37))
    kwargs = dict(
        kernel_x=kernel_x, kernel_y=kernel_y, estimator=estimator,
        bandwidth_x=scales(kernel_x, mult_x, x), bandwidth_y=None if kernel_y == "delta" else scales(kernel_y, mult_y, y),
    )
    value, grads = value_and_grads(x, y, backend=backend, **kwargs)
    ref, ref_grads = value_and_grads(x.double(), y if kernel_y == "delta" else y.double(), backend="reference", **kwargs)
    assert value.dtype == dtype and value.dim() == 0
    atol, rtol = tolerance("hsic", backend, dtype)
    torch.testing.assert_close(value.double(), ref, atol=atol, rtol=rtol)
    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-9
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=grad_rtol * float(want.abs().max()), rtol=grad_rtol)


@pytest.mark.parametrize("backend_device", backend_params("hsic"))
@pytest.mark.parametrize("kernels", [("rbf", "imq"), ("linear", "rbf")])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_gradcheck_float64(backend_device, kernels, estimator):
    backend, device = backend_device
    x, y = paired(6, 3, 2, torch.float64, device)
    kx, ky = kernels
    bx = None if kx == "linear" else [1.3, 2.9]
    x.requires_grad_(True)
    y.requires_grad_(True)
    # nondet_tol: compiled backwards may add block contributions in schedule order (last bits).
    assert torch.autograd.gradcheck(
        lambda a, b: hsic(a, b, kernel_x=kx, kernel_y=ky, bandwidth_x=bx, bandwidth_y=1.7, estimator=estimator, backend=backend),
        (x, y), eps=1e-6, atol=1e-6, nondet_tol=1e-12,
    )


def test_reference_matches_matrix_definitions():
    """The reference equals tr(KHLH)/(n−1)² and Song et al.'s unbiased formula, written with explicit matrices."""
    x, y = paired(9, 3, 2, torch.float64, "cpu")
    sx, sy = 1.3, 0.8
    n = len(x)

    def gram(a, sigma):
        return torch.exp(-torch.cdist(a, a).pow(2) / (2 * sigma * sigma))

    K, L = gram(x, sx), gram(y, sy)
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    biased = torch.trace(K @ H @ L @ H) / (n - 1) ** 2
    Kt, Lt = K - torch.diag(torch.diag(K)), L - torch.diag(torch.diag(L))
    one = torch.ones(n, dtype=torch.float64)
    unbiased = (torch.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))
    for estimator, expected in (("biased", biased), ("unbiased", unbiased)):
        got = hsic(x, y, bandwidth_x=sx, bandwidth_y=sy, estimator=estimator, backend="reference")
        assert float(got) == pytest.approx(float(expected), rel=1e-12)


def test_linear_kernels_give_the_squared_cross_covariance():
    """Linear kernels: HSIC_b = ‖Ĉ_xy‖²_F with Ĉ_xy = X̃ᵀỸ/(n−1), the sample cross-covariance."""
    x, y = paired(23, 4, 3, torch.float64, "cpu")
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (xc.T @ yc / (len(x) - 1)).pow(2).sum()
    got = hsic(x, y, kernel_x="linear", kernel_y="linear")
    assert float(got) == pytest.approx(float(expected), rel=1e-10)


def test_unbiased_estimator_is_unbiased_for_the_population_value():
    """y = A x + ε with linear kernels: HSIC = ‖Cov(x, y)‖²_F = ‖A‖²_F (x ~ N(0, I)); the U-statistic's
    mean over replications matches it, the biased estimator's does not at this small n."""
    g = torch.Generator().manual_seed(5)
    A = torch.tensor([[0.6, -0.3], [0.2, 0.4], [0.0, 0.5]], dtype=torch.float64)  # y = x @ A
    population = float(A.pow(2).sum())
    n, reps = 12, 600
    unbiased, biased = [], []
    for _ in range(reps):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = x @ A + torch.randn(n, 2, generator=g, dtype=torch.float64)
        unbiased.append(float(hsic(x, y, kernel_x="linear", kernel_y="linear", estimator="unbiased")))
        biased.append(float(hsic(x, y, kernel_x="linear", kernel_y="linear", estimator="biased")))
    u = torch.tensor(unbiased)
    standard_error = float(u.std()) / math.sqrt(reps)
    assert abs(float(u.mean()) - population) < 4 * standard_error
    assert float(torch.tensor(biased).mean()) - population > 4 * standard_error


def test_delta_kernel_equals_linear_kernel_on_one_hot_labels():
    x, labels = paired(40, 3, 1, torch.float64, "cpu", kernel_y="delta")
    one_hot = torch.nn.functional.one_hot(labels).double()
    for estimator in ("biased", "unbiased"):
        got = hsic(x, labels, kernel_y="delta", bandwidth_x=2.0, estimator=estimator)
        expected = hsic(x, one_hot, kernel_y="linear", bandwidth_x=2.0, estimator=estimator, backend="reference")
        assert float(got) == pytest.approx(float(expected), rel=1e-10)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(4, 14), p=st.integers(1, 3), q=st.integers(1, 3), shift=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_symmetry_and_invariances(n, p, q, shift, seed):
    x, y = paired(n, p, q, torch.float64, "cpu", seed=seed)
    for estimator in ("biased", "unbiased"):
        kwargs = dict(bandwidth_x=1.5, bandwidth_y=0.9, estimator=estimator)
        value = float(hsic(x, y, **kwargs))
        swapped = float(hsic(y, x, bandwidth_x=0.9, bandwidth_y=1.5, estimator=estimator))
        shifted = float(hsic(x + shift, y - shift, **kwargs))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        permuted = float(hsic(x[order], y[order], **kwargs))
        assert swapped == pytest.approx(value, abs=1e-10)
        assert shifted == pytest.approx(value, abs=1e-9)
        assert permuted == pytest.approx(value, abs=1e-10)


def test_median_heuristic_per_sample():
    x, y = paired(50, 3, 2, torch.float64, "cpu")
    expected = hsic(x, y, bandwidth_x=math.sqrt(median_sq_distance(x)), bandwidth_y=math.sqrt(median_sq_distance(y)))
    assert float(hsic(x, y)) == pytest.approx(float(expected), rel=1e-12)


def test_hsic_groups_sums_pairs_of_groups():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(30, 5, generator=g, dtype=torch.float64)
    groups = [[0, 3], [1], [2, 4]]
    expected = sum(
        float(hsic(z[:, a], z[:, b], bandwidth_x=1.2, bandwidth_y=1.2)) for a, b in ((groups[0], groups[1]), (groups[0], groups[2]), (groups[1], groups[2]))
    )
    assert float(hsic_groups(z, groups, bandwidth=1.2)) == pytest.approx(expected, rel=1e-12)
    loss = HSICLoss(groups=groups, bandwidth_x=1.2, bandwidth_y=1.2)
    assert float(loss(z)) == pytest.approx(expected, rel=1e-12)


def test_loss_reduces_dependence():
    """Drop-in use: minimising HSIC between two groups of codes decorrelates them."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(128, 1, generator=g)
    z = torch.cat([base, base + 0.1 * torch.randn(128, 1, generator=g)], 1).requires_grad_(True)
    loss = HSICLoss(groups=[[0], [1]], bandwidth_x=1.0, bandwidth_y=1.0)
    optimiser = torch.optim.Adam([z], lr=0.05)
    first = float(loss(z.detach()))
    for _ in range(60):
        value = loss(z)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
    assert float(loss(z.detach())) < 0.2 * first


# --- bad input -------------------------------------------------------------------------------

GOOD_X = torch.randn(6, 3)
GOOD_Y = torch.randn(6, 2)
LABELS = torch.tensor([0, 1, 1, 2, 0, 1])


@pytest.mark.parametrize(
    "x, y, kwargs, error, words",
    [
        (GOOD_X, GOOD_Y[:5], {}, ValueError, "same number of paired samples"),
        (GOOD_X[0], GOOD_Y, {}, ValueError, "x must be a 2-D"),
        (GOOD_X, GOOD_Y[None], {}, ValueError, "y must be a 2-D"),
        (GOOD_X, LABELS, {}, TypeError, "use kernel_y='delta'"),
        (GOOD_X, LABELS.float(), {"kernel_y": "delta"}, TypeError, "y must hold integer labels"),
        (GOOD_X, LABELS[:, None], {"kernel_y": "delta"}, ValueError, "y must be a 1-D tensor of integer labels"),
        (GOOD_X[:3], GOOD_Y[:3], {"estimator": "unbiased"}, ValueError, "at least 4 samples for the unbiased"),
        (GOOD_X[:1], GOOD_Y[:1], {}, ValueError, "at least 2 samples for the biased"),
        (torch.ones(6, 3, dtype=torch.int64), GOOD_Y, {}, TypeError, "x must be a floating-point"),
        (GOOD_X, GOOD_Y.double(), {}, TypeError, "same dtype"),
        (GOOD_X, GOOD_Y.to("meta"), {}, ValueError, "same device"),
        (GOOD_X, GOOD_Y, {"kernel_x": "delta"}, ValueError, "kernel_x must be one of"),
        (GOOD_X, GOOD_Y, {"kernel_y": "laplace"}, ValueError, "kernel_y must be one of"),
        (GOOD_X, GOOD_Y, {"bandwidth_x": 0.0}, ValueError, "bandwidth_x must be positive"),
        (GOOD_X, GOOD_Y, {"bandwidth_y": [1.0, -1.0]}, ValueError, "bandwidth_y must be positive"),
        (GOOD_X, LABELS, {"kernel_y": "delta", "bandwidth_y": 1.0}, ValueError, "bandwidth_y must be None"),
        (GOOD_X, GOOD_Y, {"kernel_x": "linear", "bandwidth_x": 1.0}, ValueError, "bandwidth_x must be None"),
        (GOOD_X, GOOD_Y, {"estimator": "plugin"}, ValueError, "estimator must be one of"),
        (torch.tensor([[0.0, float("nan"), 1.0]] * 6), GOOD_Y, {}, ValueError, "x contains NaN or Inf"),
        (GOOD_X, torch.tensor([[0.0, float("inf")]] * 6), {}, ValueError, "y contains NaN or Inf"),
        (torch.ones(6, 3), GOOD_Y, {}, ValueError, "pass bandwidth_x explicitly"),
        (GOOD_X, [[1.0]], {}, TypeError, "y must be a torch.Tensor"),
    ],
)
def test_bad_input(x, y, kwargs, error, words):
    with pytest.raises(error, match=words):
        hsic(x, y, **kwargs)


@pytest.mark.parametrize(
    "groups, words",
    [
        ([[0, 1, 2, 3]], "at least 2 groups"),
        ([[0, 1], [1, 2, 3]], "groups overlap: dimension 1"),
        ([[0, 1], [2]], r"missing \[3\]"),
        ([[0, 1], [2, 3, 4]], "dimension 4, outside"),
        ([[0, 1], []], r"groups\[1\] is empty"),
    ],
)
def test_bad_groups(groups, words):
    with pytest.raises(ValueError, match=words):
        hsic_groups(torch.randn(8, 4), groups)
