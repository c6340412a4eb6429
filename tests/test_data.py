"""aelearn.data: dSprites geometry, determinism, the factor grid, the variants, the loaders, bad input."""

from __future__ import annotations

import gzip
import math
import struct
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from aelearn.data import (
    DATASETS,
    ColorDSprites,
    CorrelatedDSprites,
    Digits,
    DSprites,
    IDXImages,
    ImageFolder,
    TensorImages,
    build_dataset,
    color_palette,
    read_idx,
)
from aelearn.data.dsprites import (
    FIRST_CENTRE,
    SCALES,
    SPRITE_HALF,
    SPRITE_RADIUS,
    reference_dsprites,
    sprite_fields,
    sprite_masks,
)

SQUARE, ELLIPSE, HEART = range(3)


def every_sprite(x: int = 0, y: int = 0) -> torch.Tensor:
    """Factors [720, 5] of every (shape, scale, orientation) at position (x, y)."""
    s = torch.arange(720)
    return torch.stack([s // 240, s // 40 % 6, s % 40, torch.full_like(s, x), torch.full_like(s, y)], 1)


def crop(images: torch.Tensor, x: int, y: int) -> torch.Tensor:
    """The 31 × 31 window around the centre pixel of position (x, y)."""
    row, col = FIRST_CENTRE + y, FIRST_CENTRE + x
    return images[..., row - SPRITE_HALF : row + SPRITE_HALF + 1, col - SPRITE_HALF : col + SPRITE_HALF + 1]


# --- the factor grid -------------------------------------------------------------------------------


def test_grid_description():
    ds = DSprites()
    assert ds.factor_names == ("shape", "scale", "orientation", "position_x", "position_y")
    assert ds.factor_sizes == (3, 6, 40, 32, 32)
    assert len(ds) == 737_280 and ds.observation_shape == (1, 64, 64)
    assert [len(v) for v in ds.factor_values] == list(ds.factor_sizes)
    assert torch.allclose(ds.factor_values[1], torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], dtype=torch.float64))
    orientations = ds.factor_values[2]
    assert float(orientations[0]) == 0 and float(orientations[-1]) < 2 * math.pi
    assert float(ds.factor_values[3][0]) == 0 and float(ds.factor_values[3][-1]) == 1


@pytest.mark.parametrize(
    "dataset", [DSprites(), ColorDSprites(n_colors=3), CorrelatedDSprites()], ids=lambda d: type(d).__name__
)
def test_index_factor_round_trip_over_the_whole_grid(dataset):
    index = torch.arange(len(dataset))
    factors = dataset.index_to_factors(index)
    # Row-major, the last factor fastest (dSprites' latents_bases).
    grid = torch.cartesian_prod(*[torch.arange(size) for size in dataset.factor_sizes])
    assert factors.dtype == torch.int64 and torch.equal(factors, grid)
    assert torch.equal(dataset.factors_to_index(factors), index)
    assert torch.equal(dataset.factors_to_index(factors.int()), index)


def test_uniform_sampling_is_seeded_and_covers_each_factor():
    ds = DSprites()
    a = ds.sample_factors(4000, torch.Generator().manual_seed(3))
    b = ds.sample_factors(4000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4000, 5) and a.dtype == torch.int64
    for j, size in enumerate(ds.factor_sizes):
        counts = torch.bincount(a[:, j], minlength=size)
        assert len(counts) == size and bool((counts > 0).all())
    images, factors = ds.sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(factors, ds.sample_factors(5, torch.Generator().manual_seed(3)))
    assert torch.equal(images, ds.images_from_factors(factors))
    assert ds.sample_factors(0).shape == (0, 5)
    assert ds.images_from_factors(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 1, 64, 64)


# --- geometry --------------------------------------------------------------------------------------


def test_matches_the_per_pixel_reference_everywhere():
    ds = DSprites()
    for x, y in [(0, 0), (31, 31), (13, 22)]:
        factors = every_sprite(x, y)
        assert torch.equal(ds.images_from_factors(factors), reference_dsprites(factors)), (x, y)
    factors = ds.sample_factors(500, torch.Generator().manual_seed(0))
    assert torch.equal(ds.images_from_factors(factors), reference_dsprites(factors))


def test_every_shape_stays_inside_the_frame():
    ds = DSprites()
    masks = sprite_masks().reshape(720, 31, 31)
    for x, y in [(0, 0), (31, 0), (0, 31), (31, 31)]:
        images = ds.images_from_factors(every_sprite(x, y))[:, 0]
        # Nothing is clipped: the whole sprite is in the image, and rows/columns 0 and 63 stay empty.
        assert torch.equal(crop(images, x, y), masks.float())
        assert torch.equal(images.sum((1, 2)), masks.sum((1, 2)).float())
        assert images[:, [0, 63], :].sum() == 0 and images[:, :, [0, 63]].sum() == 0
    # And each extreme position does reach row/column 1 (62): the positions span the frame.
    largest = ds.images_from_factors(torch.tensor([[SQUARE, 5, 5, 0, 31], [SQUARE, 5, 5, 31, 0]]))[:, 0]
    assert largest[0, 62, :].any() and largest[0, :, 1].any() and largest[1, 1, :].any() and largest[1, :, 62].any()


def test_no_pixel_centre_sits_near_an_edge():
    assert float(sprite_fields().abs().min()) > 1e-5


def test_square_area():
    masks = sprite_masks()
    for k, scale in enumerate(SCALES.tolist()):
        half_side = SPRITE_RADIUS * scale / math.sqrt(2)
        # Axis-aligned: the pixel centres at integer offsets |d| ≤ half_side, a full block.
        square = masks[SQUARE, k, 0]
        assert int(square.sum()) == (2 * math.floor(half_side) + 1) ** 2
        rows, cols = square.any(1).nonzero()[:, 0], square.any(0).nonzero()[:, 0]
        assert int(square[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].sum()) == int(square.sum())
        assert rows[0] + rows[-1] == 2 * SPRITE_HALF and cols[0] + cols[-1] == 2 * SPRITE_HALF  # centred
        # Every orientation: the area (2·half_side)², to within the pixels along the perimeter.
        areas = masks[SQUARE, k].sum((1, 2)).double()
        perimeter = 8 * half_side
        assert bool(((areas - 4 * half_side**2).abs() <= 0.5 * perimeter).all())
    areas = masks[SQUARE, 5].sum((1, 2)).double()
    assert abs(float(areas.mean()) / (2 * SPRITE_RADIUS**2) - 1) < 0.03


def test_ellipse_area_and_axes():
    masks = sprite_masks()
    for k, scale in enumerate(SCALES.tolist()):
        a, b = SPRITE_RADIUS * scale, SPRITE_RADIUS * scale / 2
        areas = masks[ELLIPSE, k].sum((1, 2)).double()
        assert bool(((areas / (math.pi * a * b) - 1).abs() < 0.08).all()), (scale, areas)
        ellipse = masks[ELLIPSE, k, 0]
        # Major axis horizontal at orientation 0: the centre row spans 2⌊a⌋ + 1 pixels, the centre column 2⌊b⌋ + 1.
        assert int(ellipse[SPRITE_HALF].sum()) == 2 * math.floor(a) + 1
        assert int(ellipse[:, SPRITE_HALF].sum()) == 2 * math.floor(b) + 1
    assert abs(float(masks[ELLIPSE, 5].sum((1, 2)).double().mean()) / (math.pi * SPRITE_RADIUS**2 / 2) - 1) < 0.02


def test_heart_symmetric_upright_and_rotating_counter_clockwise():
    masks = sprite_masks()
    rows = torch.arange(31, dtype=torch.float64)[:, None] - SPRITE_HALF
    for k in range(6):
        heart = masks[HEART, k, 0]
        assert torch.equal(heart, heart.flip(-1))  # mirror image about its vertical axis
        assert float((heart * rows).sum()) < 0  # the lobes above the centre
        bottom = heart.any(1).nonzero()[-1, 0]
        assert heart[bottom].sum() <= 3 and heart[bottom, SPRITE_HALF]  # the point at the bottom
        # 90° counter-clockwise on screen: the lobes go to the left.
        quarter = masks[HEART, k, 10].double()
        assert float((quarter * rows.T).sum()) < 0
    # Rotations by multiples of 90° are exact pixel rotations (k = 10 steps of 9°).
    for shape in range(3):
        for k in range(6):
            for orientation in range(30):
                sprite = masks[shape, k, orientation]
                assert torch.equal(masks[shape, k, orientation + 10], torch.rot90(sprite, 1, (0, 1)))


def test_position_translates_by_whole_pixels():
    ds = DSprites()
    base = every_sprite(4, 9)
    images = ds.images_from_factors(base)
    for dx, dy in [(1, 0), (0, 1), (27, 22), (-4, -9)]:
        moved = base.clone()
        moved[:, 3] += dx
        moved[:, 4] += dy
        shifted = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        assert torch.equal(ds.images_from_factors(moved), shifted), (dx, dy)


def test_shape_is_centred_at_its_position():
    ds = DSprites()
    factors = ds.sample_factors(500, torch.Generator().manual_seed(5))
    factors[:, 0] = SQUARE
    factors[:, 2] = 0
    images = ds.images_from_factors(factors)[:, 0]
    coordinates = torch.arange(64, dtype=torch.float32)
    mass = images.sum((1, 2))
    centre_x = (images.sum(1) * coordinates).sum(1) / mass
    centre_y = (images.sum(2) * coordinates).sum(1) / mass
    assert torch.equal(centre_x, (FIRST_CENTRE + factors[:, 3]).float())
    assert torch.equal(centre_y, (FIRST_CENTRE + factors[:, 4]).float())


# --- determinism -----------------------------------------------------------------------------------


def test_rendering_is_deterministic_across_calls_threads_and_batches():
    ds = DSprites()
    factors = ds.sample_factors(600, torch.Generator().manual_seed(11))
    first = ds.images_from_factors(factors)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = ds.images_from_factors(factors)
        fields_one_thread = sprite_fields()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, ds.images_from_factors(factors)) and torch.equal(first, one_thread)
    assert torch.equal(fields_one_thread, sprite_fields())
    singles = torch.cat([ds.images_from_factors(factors[i : i + 1]) for i in range(0, 600, 37)])
    assert torch.equal(singles, first[::37])
    assert set(first.unique().tolist()) == {0.0, 1.0} and first.dtype == torch.float32


# --- DataLoader ------------------------------------------------------------------------------------


class CountingDSprites(DSprites):
    def __init__(self):
        self.render_calls = 0

    def images_from_factors(self, factors):
        self.render_calls += 1
        return super().images_from_factors(factors)


def test_dataloader_fetches_each_batch_in_one_render():
    ds = CountingDSprites()
    indices = torch.randint(len(ds), (40,), generator=torch.Generator().manual_seed(2)).tolist()
    loader = DataLoader(ds, batch_size=16, sampler=indices, num_workers=0)
    batches = list(loader)
    assert ds.render_calls == 3 and [len(b[0]) for b in batches] == [16, 16, 8]
    images = torch.cat([b[0] for b in batches])
    factors = torch.cat([b[1] for b in batches])
    assert images.shape == (40, 1, 64, 64) and factors.shape == (40, 5)
    assert torch.equal(factors, ds.index_to_factors(torch.tensor(indices)))
    assert torch.equal(images, ds.images_from_factors(factors))
    image, item_factors = ds[indices[0]]
    assert torch.equal(image, images[0]) and torch.equal(item_factors, factors[0])


# --- colour and correlated variants ----------------------------------------------------------------


def test_color_dsprites_paints_the_dsprites_mask():
    ds = ColorDSprites(n_colors=5)
    assert ds.factor_names[0] == "color" and ds.factor_sizes == (5, 3, 6, 40, 32, 32)
    assert ds.observation_shape == (3, 64, 64) and len(ds) == 5 * 737_280
    images, factors = ds.sample(300, torch.Generator().manual_seed(4))
    masks = DSprites().images_from_factors(factors[:, 1:])
    palette = color_palette(5)
    assert images.shape == (300, 3, 64, 64)
    assert torch.equal(images, masks * palette[factors[:, 0]][:, :, None, None])


def test_color_palette_bright_and_distinct():
    palette = color_palette(8)
    assert palette.shape == (8, 3) and float(palette.min()) == 0.5 and float(palette.max()) == 1.0
    assert len({tuple(c) for c in palette.tolist()}) == 8
    assert torch.equal(palette[0], torch.tensor([1.0, 0.5, 0.5]))  # hue 0: red


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_correlated_pairs_follow_their_joint_table():
    ds = CorrelatedDSprites(sigma=0.1)
    factors = ds.sample_factors(20_000, torch.Generator().manual_seed(8))
    assert correlation(factors[:, 3], factors[:, 4]) > 0.8  # position_x with position_y
    assert correlation(factors[:, 0], factors[:, 1]) > 0.6  # shape with scale
    assert abs(correlation(factors[:, 2], factors[:, 3])) < 0.05  # orientation stays independent
    assert abs(correlation(factors[:, 0], factors[:, 3])) < 0.05  # across pairs: independent
    # The empirical joint of (x, y) matches the table to within sampling error.
    table = ds.pair_table(3, 4)
    counts = torch.bincount(factors[:, 3] * 32 + factors[:, 4], minlength=1024).double().reshape(32, 32) / 20_000
    assert float((counts - table).abs().sum()) < 0.15
    weights = ds.sampling_weights()
    assert weights.shape == (len(ds),) and abs(float(weights.sum()) - 1) < 1e-12
    grid_weights = weights.reshape(ds.factor_sizes)
    assert torch.allclose(grid_weights.sum((0, 1, 2)), table, atol=1e-15)
    assert torch.allclose(grid_weights.sum((2, 3, 4)), ds.pair_table(0, 1), atol=1e-15)


def test_correlated_with_infinite_sigma_is_independent():
    ds = CorrelatedDSprites(sigma=math.inf)
    assert torch.allclose(ds.sampling_weights(), torch.full((len(ds),), 1 / len(ds), dtype=torch.float64))
    factors = ds.sample_factors(20_000, torch.Generator().manual_seed(9))
    assert abs(correlation(factors[:, 3], factors[:, 4])) < 0.05


def test_correlated_pairs_option_and_reversed_order():
    ds = CorrelatedDSprites(pairs=[("position_y", "shape")], sigma=0.2)
    assert ds.pairs == ((4, 0),)
    weights = ds.sampling_weights().reshape(ds.factor_sizes)
    assert torch.allclose(weights.sum((1, 2, 3)).T, ds.pair_table(4, 0), atol=1e-15)
    assert torch.equal(ds.images_from_factors(every_sprite()), DSprites().images_from_factors(every_sprite()))


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factors, error, message",
    [
        (torch.zeros(2, 5), TypeError, "factors must have an integer dtype"),
        (torch.zeros(2, 5, dtype=torch.bool), TypeError, "factors must have an integer dtype"),
        (np.zeros((2, 5), dtype=np.int64), TypeError, "factors must be a torch.Tensor"),
        (torch.zeros(5, dtype=torch.long), ValueError, "factors must be 2-D"),
        (torch.zeros(2, 4, dtype=torch.long), ValueError, r"factors must have shape \[n, 5\]"),
        (torch.tensor([[0, 0, 40, 0, 0]]), ValueError, r"factors\[:, 2\] \(orientation\) must lie in \[0, 40\)"),
        (torch.tensor([[0, 0, 0, -1, 0]]), ValueError, r"factors\[:, 3\] \(position_x\)"),
        (torch.tensor([[3, 0, 0, 0, 0]]), ValueError, r"factors\[:, 0\] \(shape\)"),
    ],
)
def test_bad_factors(factors, error, message):
    ds = DSprites()
    with pytest.raises(error, match=message):
        ds.images_from_factors(factors)
    with pytest.raises(error, match=message):
        ds.factors_to_index(factors)


def test_bad_indices_counts_and_options():
    ds = DSprites()
    with pytest.raises(ValueError, match=r"index must lie in \[0, 737280\)"):
        ds.index_to_factors(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="index must lie"):
        ds.index_to_factors(torch.tensor([737_280]))
    with pytest.raises(TypeError, match="index must have an integer dtype"):
        ds.index_to_factors(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="index must be 1-D"):
        ds.index_to_factors(torch.tensor(1))
    with pytest.raises(IndexError, match="index"):
        ds[-1]
    with pytest.raises(IndexError, match="index"):
        ds[len(ds)]
    with pytest.raises(ValueError, match="n must be ≥ 0"):
        ds.sample_factors(-1)
    with pytest.raises(TypeError, match="n must be an int"):
        ds.sample(2.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ds.sample_factors(3, generator=0)
    with pytest.raises(ValueError, match="n_colors"):
        ColorDSprites(n_colors=0)
    with pytest.raises(ValueError, match="sigma"):
        CorrelatedDSprites(sigma=0)
    with pytest.raises(ValueError, match="sigma"):
        CorrelatedDSprites(sigma=float("nan"))
    with pytest.raises(ValueError, match="pairs: unknown factor 'colour'"):
        CorrelatedDSprites(pairs=[("colour", "shape")])
    with pytest.raises(ValueError, match="pairs: factor 'shape' appears twice"):
        CorrelatedDSprites(pairs=[("shape", "scale"), ("position_x", "shape")])
    with pytest.raises(ValueError, match="pairs must hold pairs"):
        CorrelatedDSprites(pairs=["shape"])


# --- images: tensors, .pt files, IDX, folders, digits ----------------------------------------------


def test_tensor_images_from_tensors_and_pt_files(tmp_path):
    pixels = torch.randint(256, (6, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    ds = TensorImages(pixels, labels)
    assert len(ds) == 6 and ds.observation_shape == (1, 5, 7) and ds.images.dtype == torch.uint8
    image, label = ds[2]
    assert image.dtype == torch.float32 and torch.equal(image, pixels[2][None].float() / 255) and int(label) == 2
    unlabelled = TensorImages(pixels.float() / 255)
    assert torch.equal(unlabelled.labels, torch.full((6,), -1))
    torch.save(pixels, tmp_path / "bare.pt")
    torch.save((pixels, labels), tmp_path / "pair.pt")
    torch.save({"images": pixels, "labels": labels}, tmp_path / "dict.pt")
    for name, want_labels in [("bare.pt", torch.full((6,), -1)), ("pair.pt", labels), ("dict.pt", labels)]:
        loaded = TensorImages(str(tmp_path / name))
        assert torch.equal(loaded.images, pixels[:, None]) and torch.equal(loaded.labels, want_labels), name
    assert torch.equal(TensorImages(tmp_path / "bare.pt", labels=labels).labels, labels)
    batch_images, batch_labels = next(iter(DataLoader(ds, batch_size=4)))
    assert batch_images.shape == (4, 1, 5, 7) and batch_labels.dtype == torch.int64 and batch_labels.tolist() == [0, 1, 2, 3]


def test_tensor_images_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"images: floating values must be finite and lie in \[0, 1\]"):
        TensorImages(torch.full((2, 3, 3), 2.0))
    with pytest.raises(TypeError, match="images must be uint8, bool or floating"):
        TensorImages(torch.zeros(2, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\]"):
        TensorImages(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="labels must have one entry per image"):
        TensorImages(torch.zeros(2, 3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        TensorImages(torch.zeros(2, 3, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="images: no file"):
        TensorImages(tmp_path / "missing.pt")
    torch.save({"pixels": torch.zeros(2, 3, 3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="has no key 'images'"):
        TensorImages(tmp_path / "wrong.pt")
    with pytest.raises(IndexError, match="index"):
        TensorImages(torch.zeros(2, 3, 3))[2]


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", pixels, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    assert torch.equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), torch.from_numpy(pixels))
    by_folder = IDXImages(tmp_path)
    by_file = IDXImages(tmp_path / f"train-images-idx3-ubyte{suffix}", labels=tmp_path / f"train-labels-idx1-ubyte{suffix}")
    for ds in (by_folder, by_file):
        assert len(ds) == 5 and ds.observation_shape == (1, 4, 3)
        assert ds.labels.tolist() == [3, 1, 4, 1, 5]
        assert torch.equal(ds[1][0], torch.from_numpy(pixels[1]).float()[None] / 255)
    assert IDXImages(tmp_path / f"train-images-idx3-ubyte{suffix}").labels.tolist() == [-1] * 5
    with pytest.raises(ValueError, match="no t10k-images-idx3-ubyte"):
        IDXImages(tmp_path, split="test")


def test_idx_wider_types_and_bad_files(tmp_path):
    values = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "ints", values, compress=False)
    assert torch.equal(read_idx(tmp_path / "ints"), torch.from_numpy(values))
    floats = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 2, 3, 1)
    write_idx(tmp_path / "floats", floats, compress=True)
    assert IDXImages(tmp_path / "floats").observation_shape == (1, 2, 3)
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "ints").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"sizes \(2, 3, 4\) need 112 bytes, the file has 111"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="holds torch.int32 values"):
        IDXImages(tmp_path / "ints")
    with pytest.raises(ValueError, match="split must be one of train, test"):
        IDXImages(tmp_path, split="valid")


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    pixels = {}
    for name in ["cats/b.png", "cats/a.png", "dogs/x.png", "loose.png"]:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        pixels[name] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels[name]).save(path)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ("cats", "dogs") and len(ds) == 4 and ds.observation_shape == (3, 6, 5)
    assert [p.name for p in ds.files] == ["loose.png", "a.png", "b.png", "x.png"]
    assert ds.labels.tolist() == [-1, 0, 0, 1]
    assert torch.equal(ds[1][0], torch.from_numpy(pixels["cats/a.png"]).permute(2, 0, 1).float() / 255)
    grey = ImageFolder(tmp_path, size=(4, 8), channels=1)
    assert grey.observation_shape == (1, 4, 8)
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "dogs" / "big.png")
    with pytest.raises(ValueError, match="pass size= to resize them"):
        ImageFolder(tmp_path)
    assert ImageFolder(tmp_path, size=7).observation_shape == (3, 7, 7)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ImageFolder(tmp_path, channels=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="root: no image files"):
        ImageFolder(tmp_path / "empty")


def test_digits():
    pytest.importorskip("sklearn")
    ds = Digits()
    assert len(ds) == 1797 and ds.observation_shape == (1, 8, 8) and ds.classes == tuple("0123456789")
    assert float(ds.images.min()) == 0 and float(ds.images.max()) == 1
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    large = Digits(size=32, mode="nearest")
    assert large.observation_shape == (1, 32, 32)
    assert torch.equal(large.images, ds.images.repeat_interleave(4, 2).repeat_interleave(4, 3))
    smooth = Digits(size=20, mode="bicubic")
    assert float(smooth.images.min()) >= 0 and float(smooth.images.max()) <= 1
    with pytest.raises(ValueError, match="size must be None or an int ≥ 8"):
        Digits(size=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        Digits(mode="area")


def test_missing_optional_packages_name_the_pip_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        Digits()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install Pillow"):
        ImageFolder(tmp_path)


# --- build_dataset ---------------------------------------------------------------------------------


def test_build_dataset(tmp_path):
    assert set(DATASETS) == {"dsprites", "color_dsprites", "correlated_dsprites", "digits", "tensors", "image_folder", "idx"}
    assert type(build_dataset("dsprites")) is DSprites
    assert build_dataset("color_dsprites", n_colors=2).factor_sizes[0] == 2
    assert build_dataset("correlated_dsprites", sigma=0.5).sigma == 0.5
    torch.save(torch.zeros(3, 2, 2), tmp_path / "x.pt")
    assert len(build_dataset("tensors", images=str(tmp_path / "x.pt"))) == 3
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose from dsprites, color_dsprites"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="dataset 'dsprites': unknown option.*colors.*no options"):
        build_dataset("dsprites", colors=3)
    with pytest.raises(ValueError, match="dataset 'color_dsprites': unknown option.*it accepts n_colors"):
        build_dataset("color_dsprites", colors=3)
    with pytest.raises(ValueError, match="dataset 'idx': missing option.*path"):
        build_dataset("idx")
