"""Gated PixelCNN: the incremental step on every backend, the model's dependency structure, cached
decoding identical to naive decoding, training, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from harness import backend_params, interpreted, tolerance

from aelearn.models.pixelcnn import PixelCNN
from aelearn.ops.pixelcnn import StepWeights, pixelcnn_step, reference_pixelcnn_step

pytestmark = pytest.mark.usefixtures("one_thread")

STEP = backend_params("pixelcnn_step")

# (N, W, F, C, L, kw, S, M, O, col): no images, one image, one layer, one tap, the first and the
# last column, odd sizes everywhere, and the two benchmark layouts (28×28 binary, 32×32×3 256-way).
STEP_CASES = [
    (0, 4, 3, 5, 2, 2, 7, 6, 1, 1),
    (1, 1, 1, 1, 1, 1, 1, 1, 1, 0),
    (2, 5, 3, 5, 1, 2, 7, 6, 3, 0),
    (3, 6, 4, 5, 3, 1, 7, 6, 2, 5),
    (5, 9, 6, 8, 4, 3, 8, 8, 10, 4),
    (4, 7, 9, 12, 3, 2, 12, 12, 21, 6),
    (16, 28, 64, 64, 12, 2, 64, 64, 1, 17),
    (4, 32, 96, 96, 12, 2, 96, 96, 768, 31),
]
INTERPRETED_MAX_WIDTH = 12


def step_inputs(case, dtype, device, seed=0):
    n, width, features, channels, layers, taps, skips, hidden, outputs, col = case
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(device)

    weights = StepWeights(
        w_in=normal(taps, features, 2 * channels, scale=(taps * features) ** -0.5),
        w_hidden=normal(layers - 1, taps, channels, 2 * channels, scale=(taps * channels) ** -0.5),
        w_res=normal(layers, channels, channels, scale=channels**-0.5),
        b_res=normal(layers, channels, scale=0.1),
        w_skip=normal(layers, channels, skips, scale=channels**-0.5),
        b_skip=normal(skips, scale=0.1),
        w_out1=normal(skips, hidden, scale=skips**-0.5),
        b_out1=normal(hidden, scale=0.1),
        w_out2=normal(hidden, outputs, scale=hidden**-0.5),
        b_out2=normal(outputs, scale=0.1),
    )
    x_row = normal(n, width, features)
    h_row = normal(layers, n, width, channels)
    v_row = normal(layers, n, width, 2 * channels)
    return x_row, h_row, v_row, col, weights


def float64_step(x_row, h_row, v_row, col, weights):
    return reference_pixelcnn_step(x_row.cpu().double(), h_row.cpu().double(), v_row.cpu().double(), col, *(w.cpu().double() for w in weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "n{}-w{}-f{}-c{}-l{}-kw{}-s{}-m{}-o{}-col{}".format(*c))
@pytest.mark.parametrize("backend", STEP)
def test_step_matches_float64_reference(backend, case, dtype):
    name, device = backend
    if interpreted(name, device) and case[1] > INTERPRETED_MAX_WIDTH:
        pytest.skip("the Triton interpreter takes the small cases only")
    x_row, h_row, v_row, col, weights = step_inputs(case, dtype, device)
    logits, h_col = pixelcnn_step(x_row, h_row, v_row, col, weights, backend=name)
    want_logits, want_h = float64_step(x_row, h_row, v_row, col, weights)
    atol, rtol = tolerance("pixelcnn_step", name, dtype)
    assert logits.dtype == dtype and h_col.dtype == dtype
    assert logits.shape == want_logits.shape and h_col.shape == want_h.shape
    torch.testing.assert_close(logits.cpu().double(), want_logits, atol=atol, rtol=rtol)
    torch.testing.assert_close(h_col.cpu().double(), want_h, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", STEP)
def test_step_reads_only_the_columns_it_needs(backend):
    """Columns right of col (and h_row's own column) are ignored: garbage there changes nothing."""
    name, device = backend
    x_row, h_row, v_row, col, weights = step_inputs((3, 8, 4, 6, 3, 3, 5, 4, 2, 4), torch.float64, device)
    first = pixelcnn_step(x_row, h_row, v_row, col, weights, backend=name)
    x_row[:, col + 1 :] = 1e3
    h_row[:, :, col:] = -1e3
    v_row[:, :, col + 1 :] = 1e3
    v_row[:, :, : col] = 7.0
    second = pixelcnn_step(x_row, h_row, v_row, col, weights, backend=name)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", STEP)
def test_step_is_deterministic(backend):
    name, device = backend
    inputs = step_inputs((6, 10, 5, 8, 3, 2, 8, 8, 4, 7), torch.float32, device)
    first, second = pixelcnn_step(*inputs, backend=name), pixelcnn_step(*inputs, backend=name)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_step_bad_input():
    x_row, h_row, v_row, col, weights = step_inputs((2, 5, 3, 4, 2, 2, 4, 4, 1, 2), torch.float32, "cpu")
    with pytest.raises(ValueError, match="col must be an int in"):
        pixelcnn_step(x_row, h_row, v_row, 5, weights)
    with pytest.raises(ValueError, match=r"h_row must have shape \[L, N, W, C\]"):
        pixelcnn_step(x_row, h_row[:, :1], v_row, col, weights)
    with pytest.raises(ValueError, match=r"w_hidden must have shape"):
        pixelcnn_step(x_row, h_row, v_row, col, weights._replace(w_hidden=weights.w_hidden[:, :1]))
    with pytest.raises(TypeError, match="v_row must have the dtype of x_row"):
        pixelcnn_step(x_row, h_row, v_row.double(), col, weights)
    bad = v_row.clone()
    bad[0, 0, col, 0] = math.nan
    with pytest.raises(ValueError, match="v_row contains NaN"):
        pixelcnn_step(x_row, h_row, bad, col, weights)
    bad = h_row.clone()
    bad[1, 1, col - 1, 0] = math.inf
    with pytest.raises(ValueError, match="h_row contains NaN or Inf"):
        pixelcnn_step(x_row, bad, v_row, col, weights)
    # What the step does not read may hold anything.
    bad[1, 1, col - 1, 0] = 0.0
    bad[:, :, col:] = math.nan
    assert torch.equal(pixelcnn_step(x_row, bad, v_row, col, weights)[0], pixelcnn_step(x_row, h_row, v_row, col, weights)[0])


# ---- the model ----


def random_model(dtype=torch.float64, seed=0, **options) -> PixelCNN:
    """A model with weights large enough that every allowed dependency shows, and output-head
    biases that keep its ReLUs open (a closed one hides dependencies)."""
    torch.manual_seed(seed)
    model = PixelCNN(**options).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
        model.skip_bias.fill_(5.0)
        model.head_hidden.bias.fill_(5.0)
    return model.eval()


def dependencies(model: PixelCNN, c: int, i: int, j: int) -> set[tuple[int, int, int]]:
    """The (channel, row, column) input values that the logits of (c, i, j) depend on, found by
    changing each one in turn (float64, random weights)."""
    torch.manual_seed(1)
    x = torch.randint(model.levels, (1, *model.image_shape))
    base = model(x)[0, c, ..., i, j]
    found = set()
    channels, height, width = model.image_shape
    for cc, ii, jj in itertools.product(range(channels), range(height), range(width)):
        changed = x.clone()
        changed[0, cc, ii, jj] = (changed[0, cc, ii, jj] + 1) % model.levels
        if not torch.equal(model(changed)[0, c, ..., i, j], base):
            found.add((cc, ii, jj))
    return found


def causal_past(shape, c, i, j, window=None) -> set[tuple[int, int, int]]:
    channels, height, width = shape
    past = set()
    for cc, ii, jj in itertools.product(range(channels), range(height), range(width)):
        before = ii < i or (ii == i and jj < j) or (ii == i and jj == j and cc < c)
        inside = window is None or (i - ii <= window and abs(j - jj) <= window)
        if before and inside:
            past.add((cc, ii, jj))
    return past


@pytest.mark.parametrize("position", [(0, 0, 0), (0, 3, 2), (0, 4, 4), (0, 2, 0), (0, 0, 4)])
def test_no_blind_spot_and_causal(position):
    """Every pixel before (i, j) in raster order is seen, none after: the vertical/horizontal split
    leaves no blind spot (a masked-convolution PixelCNN misses the region up and to the right)."""
    model = random_model(image_shape=(1, 5, 5), num_layers=6, channels=8)
    assert dependencies(model, *position) == causal_past(model.image_shape, *position)


@pytest.mark.parametrize("position", [(0, 1, 1), (1, 2, 2), (2, 1, 0), (2, 2, 3)])
def test_channel_order_within_a_pixel(position):
    """RGB: channel c of a pixel sees channels < c of that pixel and everything before it."""
    model = random_model(image_shape=(3, 3, 4), num_layers=5, channels=12, output="categorical", levels=4)
    assert dependencies(model, *position) == causal_past(model.image_shape, *position)


@pytest.mark.parametrize("kernel_size,receptive_field", [(3, 1), (3, 2), (5, 2), (5, 4)])
def test_receptive_field_is_the_window(kernel_size, receptive_field):
    model = random_model(image_shape=(1, 7, 7), num_layers=4, channels=4, kernel_size=kernel_size, receptive_field=receptive_field)
    for position in [(0, 6, 3), (0, 5, 6), (0, 3, 0)]:
        assert dependencies(model, *position) == causal_past(model.image_shape, *position, window=receptive_field)


def test_nll_is_the_categorical_cross_entropy():
    model = random_model(image_shape=(2, 3, 3), num_layers=2, channels=4, output="categorical", levels=5)
    x = torch.randint(5, (4, 2, 3, 3))
    logits = model(x)
    want = -torch.log_softmax(logits, dim=2).gather(2, x[:, :, None]).squeeze(2).flatten(1).sum(1)
    torch.testing.assert_close(model.nll(x), want)
    torch.testing.assert_close(model.bits_per_dim(x), want.mean() / (18 * math.log(2)))
    # The same images as floats on the grid of levels give the same likelihood.
    torch.testing.assert_close(model.nll(x / 4.0), want)


def test_binary_nll_and_bits_per_dim_of_an_uninformed_model():
    """With all weights zero every logit is 0: exactly one bit per dimension."""
    model = PixelCNN((1, 4, 4), num_layers=2, channels=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    x = torch.randint(2, (3, 1, 4, 4))
    assert model.bits_per_dim(x).item() == pytest.approx(1.0, abs=1e-6)
    assert model.loss(x.float())["loss"].item() == pytest.approx(1.0, abs=1e-6)


# ---- decoding ----

SAMPLING_CASES = {
    "binary": dict(image_shape=(1, 6, 7), num_layers=4, channels=8),
    "rgb-256": dict(image_shape=(3, 4, 4), num_layers=3, channels=12, output="categorical", levels=256),
    "conditioned": dict(image_shape=(2, 5, 4), num_layers=3, channels=8, output="categorical", levels=5, cond_dim=3, cond_channels=2),
    "window-k5": dict(image_shape=(1, 6, 6), num_layers=4, channels=8, kernel_size=5, receptive_field=2),
    "code-map-prior": dict(image_shape=(1, 5, 5), num_layers=3, channels=8, output="categorical", levels=16, num_classes=4),
}


def conditions(model: PixelCNN, n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    dtype = model.embedding.dtype
    cond = torch.randn(n, model.cond_dim, generator=g).to(dtype) if model.cond_dim else None
    cond_map = torch.randn(n, model.cond_channels, *model.image_shape[1:], generator=g).to(dtype) if model.cond_channels else None
    return cond, cond_map


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(SAMPLING_CASES), ids=list(SAMPLING_CASES))
@pytest.mark.parametrize("backend", STEP)
def test_cached_sampling_is_naive_sampling(backend, case, dtype):
    """Same generator seed: identical samples, and the logits used at every step agree."""
    name, device = backend
    if interpreted(name, device) and case not in ("binary", "conditioned"):
        pytest.skip("the Triton interpreter takes two of the cases")
    model = random_model(dtype, **SAMPLING_CASES[case]).to(device)
    n = 3
    cond, cond_map = conditions(model, n)
    cond = cond.to(device) if cond is not None else None
    cond_map = cond_map.to(device) if cond_map is not None else None
    generator = lambda: torch.Generator(device).manual_seed(5)  # noqa: E731
    naive, naive_logits = model.sample(n, cond=cond, cond_map=cond_map, generator=generator(), method="naive", return_logits=True)
    cached, cached_logits = model.sample(n, cond=cond, cond_map=cond_map, generator=generator(), backend=name, return_logits=True)
    assert torch.equal(cached, naive)
    assert (cached_logits - naive_logits).abs().max().item() < (1e-4 if dtype == torch.float32 else 1e-10)
    assert int(naive.min()) >= 0 and int(naive.max()) < model.levels


def test_samples_follow_the_model_distribution():
    """A model whose logits ignore the input (zero weights, biases b) draws level k with
    probability softmax(b)_k: checked by a chi-square-style bound on 6000 draws."""
    model = PixelCNN((1, 10, 10), num_layers=1, channels=2, output="categorical", levels=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.head_out.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    draws = model.sample(60, generator=torch.Generator().manual_seed(0), backend="reference").flatten()
    p = torch.softmax(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), 0)
    frequencies = torch.bincount(draws, minlength=3).double() / len(draws)
    assert ((frequencies - p).abs() < 4 * (p * (1 - p) / len(draws)).sqrt()).all()


def test_sampling_is_reproducible_and_depends_on_the_seed():
    model = random_model(torch.float32, image_shape=(1, 5, 5), num_layers=2, channels=4)
    first = model.sample(4, generator=torch.Generator().manual_seed(3), backend="reference")
    again = model.sample(4, generator=torch.Generator().manual_seed(3), backend="reference")
    other = model.sample(4, generator=torch.Generator().manual_seed(4), backend="reference")
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_class_conditioning_from_labelled_batches():
    model = PixelCNN((1, 4, 4), num_layers=2, channels=4, num_classes=3)
    x = torch.randint(2, (5, 1, 4, 4)).float()
    labels = torch.tensor([0, 1, 2, 1, 0])
    loss = model.loss((x, labels))["loss"]
    assert torch.isfinite(loss)
    factors = torch.stack([labels, torch.zeros(5, dtype=torch.long)], 1)
    assert model.loss((x, factors))["loss"].item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\)"):
        model.loss((x, torch.tensor([0, 1, 3, 1, 0])))
    with pytest.raises(ValueError, match="batches must carry labels"):
        model.loss(x)


def test_training_lowers_bits_per_dim():
    """A few hundred Adam steps on a tiny procedural dataset (random horizontal bars): the
    bits per dimension fall well below the untrained model's (about 1)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(8, (256,), generator=g)
    images = torch.zeros(256, 1, 8, 8)
    images[torch.arange(256), 0, rows] = 1.0
    torch.manual_seed(0)
    model = PixelCNN((1, 8, 8), num_layers=3, channels=8)
    before = model.bits_per_dim(images).item()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    for step in range(80):
        batch = images[torch.randint(256, (16,), generator=g)]
        optimiser.zero_grad()
        model.loss(batch, step=step)["loss"].backward()
        optimiser.step()
    after = model.bits_per_dim(images).item()
    # The data's entropy is log2(8) bits per image: 3 / 64 ≈ 0.047 bits per dimension.
    assert before > 0.5 and after < 0.25, (before, after)


# ---- bad input ----


def test_bad_options():
    with pytest.raises(ValueError, match="channels must be divisible by the image's channel count 3"):
        PixelCNN((3, 4, 4), channels=8)
    with pytest.raises(ValueError, match="output must be one of"):
        PixelCNN((1, 4, 4), output="gaussian")
    with pytest.raises(ValueError, match="output='binary' has 2 levels"):
        PixelCNN((1, 4, 4), levels=256)
    with pytest.raises(ValueError, match="receptive_field must be a multiple of kernel_size // 2 = 2"):
        PixelCNN((1, 4, 4), kernel_size=5, receptive_field=3)
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        PixelCNN((1, 4, 4), kernel_size=4)


def test_bad_images_and_conditions():
    model = PixelCNN((1, 4, 4), num_layers=2, channels=4, cond_dim=2)
    cond = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 1, 4, 4\]"):
        model(torch.zeros(2, 1, 5, 4, dtype=torch.long), cond)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 1, 4, 4\]"):
        model(torch.zeros(2, 3, 4, 4, dtype=torch.long), cond)
    with pytest.raises(ValueError, match=r"x must hold levels in \[0, 2\)"):
        model(torch.full((2, 1, 4, 4), 2), cond)
    with pytest.raises(ValueError, match="binarise the images first"):
        model(torch.full((2, 1, 4, 4), 0.5), cond)
    with pytest.raises(ValueError, match=r"cond must be a tensor of shape \[2, 2\]"):
        model(torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cond_map given, but the model was built without cond_channels"):
        model(torch.zeros(2, 1, 4, 4, dtype=torch.long), cond, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"cond must be a tensor of shape \[3, 2\]"):
        model.sample(3, cond=cond)


def test_bad_sampling_arguments():
    model = PixelCNN((1, 3, 3), num_layers=1, channels=2)
    with pytest.raises(ValueError, match="method must be one of naive, cached"):
        model.sample(2, method="fast")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        model.sample(2, generator=3)
    with pytest.raises(ValueError, match="n must be an int"):
        model.sample(-1)
    with pytest.raises(ValueError, match="backend applies to method='cached' only"):
        model.sample(2, method="naive", backend="cpp")
    on_meta = PixelCNN((1, 3, 3), num_layers=1, channels=2).to("meta")
    with pytest.raises(ValueError, match=r"generator must be on the model's device \(meta\)"):
        on_meta.sample(2, generator=torch.Generator().manual_seed(0))
    assert model.sample(0).shape == (0, 1, 3, 3)
