"""Nearest-codebook search: every backend against the float64 argmin, ties, cancellation, gradients, stats."""

from __future__ import annotations

import pytest
import torch
from harness import INTERPRETED_MAX_SAMPLES, backend_params, interpreted, tolerance

from aelearn.ops import reference_vq_nearest, vq_code_stats, vq_nearest

# (N, K, D): no rows, one code, one dimension, primes, a non-contiguous z, and blocks larger than
# any backend's tile in every direction.
SHAPES = [(0, 3, 4), (1, 1, 1), (2, 3, 2), (7, 17, 3), (70, 130, 5), (41, 256, 64), (300, 1000, 8), (1000, 70, 100)]
# The Triton interpreter takes seconds per program: small searches only (130 codes still span two
# of its code tiles).
INTERPRETED_MAX_CODES = 150
DATA = ["normal", "far", "duplicates", "on_codes", "midpoints"]


def search_inputs(n: int, k: int, d: int, data: str, dtype, device, seed: int = 0):
    """z [n, d], codebook [k, d] of one of the DATA kinds.

    far: everything at 1000 + 0.01·noise, where ‖z‖² + ‖e‖² − 2 z·e loses ~12 digits to cancellation;
    duplicates: the second half of the codebook repeats the first (exact ties → lowest index);
    on_codes: every third row of z is a code (distance 0); midpoints: rows halfway between two codes.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64)
    if data == "far":
        z, codebook = 1000 + 0.01 * z, 1000 + 0.01 * codebook
    elif data == "duplicates":
        half = (k + 1) // 2
        codebook = torch.cat([codebook[:half], codebook[: k - half]])
    elif data == "on_codes" and n:
        picks = torch.randint(k, (n,), generator=g)
        z[::3] = codebook[picks[::3]]
    elif data == "midpoints" and n and k >= 2:
        a, b = torch.randint(k, (2, n), generator=g)
        z = (codebook[a] + codebook[b]) / 2
    z, codebook = z.to(dtype), codebook.to(dtype)
    if n == 41:
        z = z.T.contiguous().T
    return z.to(device), codebook.to(device)


def float64_distances(z, codebook):
    return ((z.double().cpu()[:, None, :] - codebook.double().cpu()[None]) ** 2).sum(-1)


def assert_float64_argmin(indices, z, codebook, rtol_ties: float):
    """``indices`` is the float64 argmin (first minimum), except where the two best distances are
    within ``rtol_ties`` of each other — there the chosen distance must be within that of the best."""
    distances = float64_distances(z, codebook)
    want = distances.argmin(1)
    got = indices.cpu()
    differ = got != want
    if bool(differ.any()):
        best = distances[differ].gather(1, want[differ, None])[:, 0]
        chosen = distances[differ].gather(1, got[differ, None])[:, 0]
        assert bool((chosen - best <= rtol_ties * best).all()), (differ.nonzero()[:5].flatten(), chosen - best)
    return distances


@pytest.mark.parametrize("backend_device", backend_params("vq_nearest"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}-D{s[2]}")
def test_matches_float64_argmin(backend_device, dtype, shape):
    backend, device = backend_device
    n, k, d = shape
    if interpreted(backend, device) and (n > INTERPRETED_MAX_SAMPLES or k > INTERPRETED_MAX_CODES):
        pytest.skip("the Triton interpreter gets the small shapes only")
    atol, rtol = tolerance("vq_nearest", backend, dtype)
    for data in DATA:
        z, codebook = search_inputs(n, k, d, data, dtype, device)
        indices, sqdist = vq_nearest(z, codebook, backend=backend)
        assert indices.dtype == torch.int64 and indices.shape == (n,) and indices.device.type == device, data
        assert sqdist.dtype == dtype and sqdist.shape == (n,), data
        # Both backends and this check sum float64 differences, possibly in different orders.
        distances = assert_float64_argmin(indices, z, codebook, rtol_ties=1e-13)
        want_sqdist = distances.gather(1, indices.cpu()[:, None])[:, 0]
        torch.testing.assert_close(sqdist.cpu().double(), want_sqdist, atol=atol, rtol=rtol, msg=lambda m: f"{data}: {m}")
        assert bool((sqdist >= 0).all()), data


@pytest.mark.parametrize("backend_device", backend_params("vq_nearest"))
def test_exact_ties_go_to_the_lowest_index(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    codes = torch.randn(5, 6, generator=g)
    # Codes 0–4 then the same five again, twice: every distance appears three times.
    codebook = torch.cat([codes, codes, codes]).to(device)
    z = torch.randn(60, 6, generator=g).to(device)
    z[:5] = codes.to(device)
    indices, sqdist = vq_nearest(z, codebook, backend=backend)
    want = float64_distances(z, codes).argmin(1)
    assert torch.equal(indices.cpu(), want)
    assert bool((sqdist[:5] == 0).all())


@pytest.mark.parametrize("backend_device", backend_params("vq_nearest"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gradients_of_sqdist(backend_device, dtype):
    backend, device = backend_device
    z, codebook = search_inputs(37, 11, 5, "normal", dtype, device, seed=5)
    z.requires_grad_(True)
    codebook.requires_grad_(True)
    indices, sqdist = vq_nearest(z, codebook, backend=backend)
    upstream = torch.linspace(-1.5, 2.0, len(z), dtype=dtype, device=device)
    grad_z, grad_codebook = torch.autograd.grad((sqdist * upstream).sum(), (z, codebook))
    z64, codebook64 = (t.detach().double().requires_grad_(True) for t in (z, codebook))
    chosen = ((z64 - codebook64[indices]) ** 2).sum(1)
    want_z, want_codebook = torch.autograd.grad((chosen * upstream.double()).sum(), (z64, codebook64))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grad_z.double(), want_z, rtol=rtol, atol=rtol * float(want_z.abs().max()))
    torch.testing.assert_close(grad_codebook.double(), want_codebook, rtol=rtol, atol=rtol * float(want_codebook.abs().max()))


@pytest.mark.parametrize("backend_device", backend_params("vq_nearest"))
def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    z, codebook = search_inputs(9, 4, 3, "normal", torch.float64, device, seed=7)
    z.requires_grad_(True)
    codebook.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: vq_nearest(a, b, backend=backend)[1], (z, codebook))


def test_reference_is_the_plain_argmin():
    z, codebook = search_inputs(50, 30, 7, "normal", torch.float32, "cpu", seed=2)
    indices, sqdist = reference_vq_nearest(z, codebook)
    explicit = torch.cdist(z.double(), codebook.double()).pow(2)
    assert torch.equal(indices, explicit.argmin(1))
    torch.testing.assert_close(sqdist.double(), explicit.min(1).values, rtol=1e-6, atol=1e-9)


def test_cancellation_defeats_the_expansion_but_not_the_search():
    """Far from the origin the float32 expansion picks wrong codes; the search does not."""
    z, codebook = search_inputs(2000, 64, 16, "far", torch.float32, "cpu", seed=11)
    expansion = (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T).argmin(1)
    want = float64_distances(z, codebook).argmin(1)
    assert bool((expansion != want).any()), "the case no longer exercises cancellation"
    assert torch.equal(vq_nearest(z, codebook)[0], want)


def test_code_stats_match_a_float64_one_hot():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1000, 5, generator=g)
    indices = torch.randint(0, 9, (1000,), generator=g)
    counts, sums = vq_code_stats(z, indices, 12)
    one_hot = torch.nn.functional.one_hot(indices, 12).double()
    assert counts.dtype == torch.int64 and torch.equal(counts, one_hot.sum(0).long())
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, one_hot.T @ z.double(), rtol=1e-14, atol=1e-12)
    assert bool((counts[9:] == 0).all()) and bool((sums[9:] == 0).all())


def test_code_stats_keep_float64_precision_over_many_rows():
    """A float32 running sum of 200,000 copies of 0.1 drifts by ~1e-3 relative; float64 does not."""
    z = torch.full((200_000, 1), 0.1)
    counts, sums = vq_code_stats(z, torch.zeros(200_000, dtype=torch.int64), 1)
    assert int(counts[0]) == 200_000
    assert abs(float(sums[0, 0]) / (200_000 * float(z[0, 0])) - 1) < 1e-12


@pytest.mark.parametrize(
    "z, codebook, error, words",
    [
        (torch.randn(4, 3), torch.randn(5, 2), ValueError, "codebook must have the dimension of z (3)"),
        (torch.randn(4, 3), torch.randn(0, 3), ValueError, "codebook must hold at least one code"),
        (torch.randint(0, 3, (4, 3)), torch.randn(5, 3), TypeError, "z must be a floating-point tensor"),
        (torch.randn(4, 3), torch.randint(0, 3, (5, 3)), TypeError, "codebook must be a floating-point tensor"),
        (torch.tensor([[0.0, float("nan")]]), torch.randn(5, 2), ValueError, "z contains NaN or Inf"),
        (torch.randn(4, 2), torch.tensor([[0.0, float("inf")]]), ValueError, "codebook contains NaN or Inf"),
        (torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64), TypeError, "codebook must have the dtype of z"),
        (torch.randn(4), torch.randn(5, 3), ValueError, "z must be a 2-D tensor"),
        (torch.randn(4, 3), torch.randn(5, 3, 1), ValueError, "codebook must be a 2-D tensor"),
        (torch.randn(4, 0), torch.randn(5, 0), ValueError, "z must have at least one feature"),
    ],
)
def test_bad_input(z, codebook, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        vq_nearest(z, codebook)


@pytest.mark.parametrize(
    "indices, num_codes, error, words",
    [
        (torch.tensor([0, 1, 5]), 5, ValueError, r"indices must lie in \[0, 5\), got values in \[0, 5\]"),
        (torch.tensor([0, -1, 2]), 5, ValueError, r"indices must lie in \[0, 5\)"),
        (torch.tensor([0, 1]), 5, ValueError, "indices must be a 1-D tensor with one code per row of z"),
        (torch.tensor([0.0, 1.0, 2.0]), 5, TypeError, "indices must be an int32 or int64 tensor"),
        (torch.tensor([0, 1, 2]), 0, ValueError, "num_codes must be a positive int"),
    ],
)
def test_code_stats_bad_input(indices, num_codes, error, words):
    with pytest.raises(error, match=words):
        vq_code_stats(torch.randn(3, 2), indices, num_codes)
