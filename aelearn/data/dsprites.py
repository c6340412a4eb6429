"""dSprites (Matthey et al. 2017) made procedurally: the full factor grid, rendered on demand, no download.

Factors (int64 indices; the value each index stands for in brackets):

=============  =====  ============================================================
shape            3    square, ellipse, heart
scale            6    linspace(0.5, 1, 6)
orientation     40    2π·k/40, k = 0..39 (9° steps in [0, 2π); the original's 40 values
                      include both 0 and 2π, i.e. one pose twice)
position_x      32    linspace(0, 1, 32), left to right
position_y      32    linspace(0, 1, 32), top to bottom
=============  =====  ============================================================

737,280 combinations, index = row-major over (shape, scale, orientation, position_x, position_y) as
in the original's ``latents_bases`` (its constant colour factor dropped).

Geometry (pixel ``i`` covers [i, i + 1), so its centre is at i + 0.5; images are 64 × 64, binary):

- *Position.* The shape is centred at ``(16.5 + 31·x, 16.5 + 31·y)`` pixels: one position step is
  exactly one pixel, and the centre is always a pixel centre (column ``16 + x_index``, row
  ``16 + y_index``). Moving the position therefore translates the image by whole pixels, exactly.
- *Scale.* At scale ``s`` the shape lies inside a disk of radius ``SPRITE_RADIUS · s`` =
  15.5·s pixels (0.242·s of the image width) around its centre, at every orientation. Centres span
  16.5 … 47.5 (0.26 … 0.74 of the width), so every shape at every scale, orientation and position lies in the rows and columns
  1 … 62: at least one empty pixel to each border, nothing is ever clipped.
- *Shapes*, in units of that radius, at orientation 0 (u to the right, v up on screen):
  square: ``max(|u|, |v|) ≤ 1/√2`` (its corners touch the unit circle; side 21.9 px at scale 1);
  ellipse: ``u² + (2v)² ≤ 1`` (semi-axes 1 and ½, major axis horizontal);
  heart: a square of side ``L`` standing on a corner, with two disks of diameter ``L`` on its two
  upper sides (lobes up, point down), shifted so that its bounding box is centred, and sized so
  that its farthest point is on the unit circle (``L ≈ 1.051``). Mirror-symmetric about the
  vertical axis through the centre.
- *Orientation* θ rotates the shape counter-clockwise on screen about its centre.
- *Rasterisation.* A pixel is 1 when its centre lies in the (closed) shape, else 0. No pixel
  centre comes within 1e-5 radii of an edge at any scale and orientation, so the bits do not hang
  on rounding.

This follows the original's description (shape centred at the position, scale relative to the
image, orientation rotating the shape); it does not reproduce the original's pixels. As there, the
square looks the same every 90° and the ellipse every 180°: orientation is only partly
identifiable from the image.

Rendering: the 3·6·40 = 720 sprites (shape, scale, orientation) are rasterised once, in float64, into
31 × 31 windows (pixel offsets −15 … 15 from the centre, which hold the 15.5-pixel disk) and cached
per device (2.8 MB); an image is then its sprite scattered at the integer offset of its position,
for a whole batch in one ``scatter_``. Same factors give the same bits on every call, thread
count and batch composition.

:class:`ColorDSprites` adds a colour factor; :class:`CorrelatedDSprites` samples some factors jointly.
"""

from __future__ import annotations

import functools
import math

import torch

from aelearn.data.factors import FactorDataset

IMAGE_SIZE = 64
SHAPES = ("square", "ellipse", "heart")
SCALES = torch.linspace(0.5, 1.0, 6, dtype=torch.float64)
ORIENTATIONS = 2 * math.pi * torch.arange(40, dtype=torch.float64) / 40
POSITIONS = torch.linspace(0.0, 1.0, 32, dtype=torch.float64)
# The sprite disk at scale 1 and the half-range of the centres are both 15.5 px: a shape at the
# extreme position reaches pixel row/column 1 (or 62), never the border.
SPRITE_RADIUS = 15.5
# Pixel offsets −15 … 15 from the centre pixel hold every pixel centre within 15.5 px of it.
SPRITE_HALF = 15
SPRITE_SIZE = 2 * SPRITE_HALF + 1
# Pixel row/column of the shape's centre at position index 0.
FIRST_CENTRE = 16


def _heart_field(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """≤ 0 inside the unit heart (see the module docstring), at shape-frame points ``u, v``."""
    # With side L and the square's centre at v0: top of the lobes v0 + L/(2√2) + L/2, bottom corner
    # v0 − L/√2; centring the bounding box gives v0 = −L(1 − 1/√2)/4.
    lobe_offset = 1 / (2 * math.sqrt(2))
    v0 = -(1 - 1 / math.sqrt(2)) / 4
    # Farthest point from the centre: on a lobe, beyond its centre (±L·lobe_offset, v0 + L·lobe_offset).
    side = 1 / (math.hypot(lobe_offset, v0 + lobe_offset) + 0.5)
    lobe_u, lobe_v, half_diagonal = side * lobe_offset, side * (v0 + lobe_offset), side / math.sqrt(2)
    diamond = u.abs() + (v - side * v0).abs() - half_diagonal
    lobes = (u.abs() - lobe_u) ** 2 + (v - lobe_v) ** 2 - (side / 2) ** 2
    return torch.minimum(diamond, lobes)


def _shape_fields(right: torch.Tensor, up: torch.Tensor, orientation: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Implicit functions ``[3, ...]`` of (square, ellipse, heart), ≤ 0 inside, in units of the shape's
    radius, at pixel offsets ``right, up`` (pixels, from the shape's centre) for the rotation angle
    ``orientation`` (radians) and ``scale`` value; all four broadcast together."""
    cos, sin = orientation.cos(), orientation.sin()
    # A pixel is in the shape rotated by θ when the pixel rotated by −θ is in the upright shape.
    radius = SPRITE_RADIUS * scale
    u = (cos * right + sin * up) / radius
    v = (cos * up - sin * right) / radius
    square = torch.maximum(u.abs(), v.abs()) - 1 / math.sqrt(2)
    ellipse = u**2 + (2 * v) ** 2 - 1
    return torch.stack([square, ellipse, _heart_field(u, v)])


def sprite_fields() -> torch.Tensor:
    """Implicit functions of every (shape, scale, orientation) sprite at its pixel centres: float64
    ``[3, 6, 40, 31, 31]``, ≤ 0 inside the shape, in units of the shape's radius.

    ``fields[shape, scale, orientation, SPRITE_HALF + dy, SPRITE_HALF + dx]`` is the pixel ``dy``
    rows below and ``dx`` columns right of the centre pixel. No value lies within 1e-5 of 0 (the
    tests check it), so last-bit differences of sin/cos between platforms cannot flip a pixel.
    """
    offsets = torch.arange(-SPRITE_HALF, SPRITE_HALF + 1, dtype=torch.float64)
    right = offsets[None, None, None, :]
    up = -offsets[None, None, :, None]  # rows go down the screen
    return _shape_fields(right, up, ORIENTATIONS[None, :, None, None], SCALES[:, None, None, None])


def sprite_masks() -> torch.Tensor:
    """Every (shape, scale, orientation) sprite rasterised: bool ``[3, 6, 40, 31, 31]``, CPU, indexed
    as :func:`sprite_fields`. Elementwise float64 ops only: the same bits on any thread count."""
    return sprite_fields() <= 0


@functools.cache
def _sprite_bank(device: torch.device) -> torch.Tensor:
    """:func:`sprite_masks` as float32 ``[720, 31·31]`` rows on ``device``, the source of ``scatter_``."""
    return sprite_masks().reshape(-1, SPRITE_SIZE * SPRITE_SIZE).float().to(device)


@functools.cache
def _sprite_window(device: torch.device) -> torch.Tensor:
    """Flat image offsets ``[31·31]`` of a sprite's pixels relative to its top-left pixel."""
    rows = torch.arange(SPRITE_SIZE, device=device)
    return (rows[:, None] * IMAGE_SIZE + rows[None, :]).reshape(-1)


def render_dsprites(shape: torch.Tensor, scale: torch.Tensor, orientation: torch.Tensor,
                    position_x: torch.Tensor, position_y: torch.Tensor) -> torch.Tensor:
    """Binary dSprites images ``[n, 1, 64, 64]`` float32 from factor indices, each int64 ``[n]``.

    The indices are not checked here: :meth:`DSprites.images_from_factors` checks them.
    """
    device = shape.device
    n = shape.shape[0]
    sprite = (shape * len(SCALES) + scale) * len(ORIENTATIONS) + orientation
    top_left = (FIRST_CENTRE - SPRITE_HALF + position_y) * IMAGE_SIZE + (FIRST_CENTRE - SPRITE_HALF + position_x)
    images = torch.zeros(n, IMAGE_SIZE * IMAGE_SIZE, device=device)
    images.scatter_(1, top_left[:, None] + _sprite_window(device), _sprite_bank(device).index_select(0, sprite))
    return images.view(n, 1, IMAGE_SIZE, IMAGE_SIZE)


def reference_dsprites(factors: torch.Tensor) -> torch.Tensor:
    """The specification of :func:`render_dsprites`, image by image from the geometry: every one of
    the 64 × 64 pixel centres of each image tested against its shape, centred at ``16.5 + 31·x``.

    ``factors: [n, 5]`` int64 (shape, scale, orientation, position_x, position_y), unchecked;
    returns ``[n, 1, 64, 64]`` float32. Holds ``[3, n, 64, 64]`` float64 fields: tests and benchmarks only.
    """
    shape, scale, orientation, position_x, position_y = factors.cpu().long().unbind(1)
    centre = FIRST_CENTRE + 0.5  # at position 0, in pixel units (pixel i covers [i, i + 1))
    pixel_centres = torch.arange(IMAGE_SIZE, dtype=torch.float64) + 0.5
    span = len(POSITIONS) - 1
    right = pixel_centres[None, None, :] - (centre + span * POSITIONS[position_x])[:, None, None]
    up = (centre + span * POSITIONS[position_y])[:, None, None] - pixel_centres[None, :, None]
    fields = _shape_fields(right, up, ORIENTATIONS[orientation][:, None, None], SCALES[scale][:, None, None])
    inside = fields.gather(0, shape[None, :, None, None].expand(1, -1, IMAGE_SIZE, IMAGE_SIZE))[0] <= 0
    return inside.float()[:, None].to(factors.device)


class DSprites(FactorDataset):
    """dSprites: 64 × 64 binary images of a shape, factors (shape, scale, orientation, position_x,
    position_y) with sizes (3, 6, 40, 32, 32); geometry in the module docstring.

    ``images_from_factors(factors [n, 5]) -> [n, 1, 64, 64]`` float32 in {0, 1}, on ``factors``'
    device. ``factor_values[j]`` holds the value of each index of factor ``j`` (float64; shapes 0, 1, 2).
    """

    factor_names = ("shape", "scale", "orientation", "position_x", "position_y")
    factor_sizes = (3, 6, 40, 32, 32)
    observation_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    factor_values = (torch.arange(3, dtype=torch.float64), SCALES, ORIENTATIONS, POSITIONS, POSITIONS)

    def images_from_factors(self, factors: torch.Tensor) -> torch.Tensor:
        self.check_factors(factors)
        return render_dsprites(*factors.long().unbind(1))


def color_palette(n_colors: int) -> torch.Tensor:
    """``n_colors`` RGB colours ``[n_colors, 3]`` float32: hues ``c / n_colors`` around the HSV wheel at
    saturation ½ and value 1, so every channel lies in [0.5, 1] (as the bright random colours of
    disentanglement_lib's colour dSprites) and the shape shows in all three channels."""
    hue = torch.arange(n_colors, dtype=torch.float64) / n_colors
    saturation, value = 0.5, 1.0
    # HSV → RGB: channel n (n = 5, 3, 1 for R, G, B) is v − v·s·clamp(min(k, 4 − k), 0, 1), k = (n + 6h) mod 6.
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64) + 6 * hue[:, None]) % 6
    return (value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)).float()


class ColorDSprites(DSprites):
    """dSprites in colour: a first factor ``color`` (``n_colors`` values, uniform like the others)
    paints the shape with ``color_palette(n_colors)[color]``; black background.

    Factors (color, shape, scale, orientation, position_x, position_y), sizes (n_colors, 3, 6, 40,
    32, 32); images ``[n, 3, 64, 64]`` float32 in [0, 1].
    """

    def __init__(self, n_colors: int = 8):
        if isinstance(n_colors, bool) or not isinstance(n_colors, int) or n_colors < 1:
            raise ValueError(f"n_colors must be an int ≥ 1, got {n_colors!r}")
        self.n_colors = n_colors
        self.palette = color_palette(n_colors)
        self.factor_names = ("color", *DSprites.factor_names)
        self.factor_sizes = (n_colors, *DSprites.factor_sizes)
        self.factor_values = (torch.arange(n_colors, dtype=torch.float64), *DSprites.factor_values)
        self.observation_shape = (3, IMAGE_SIZE, IMAGE_SIZE)

    def images_from_factors(self, factors: torch.Tensor) -> torch.Tensor:
        self.check_factors(factors)
        color, *sprite = factors.long().unbind(1)
        masks = render_dsprites(*sprite)
        return masks * self.palette.to(factors.device)[color][:, :, None, None]


class CorrelatedDSprites(DSprites):
    """dSprites whose sampled factors are correlated in pairs (Träuble et al. 2021, "On Disentangled
    Representations Learned from Correlated Data").

    For each pair (a, b) of ``pairs`` (default: position_x with position_y, and shape with scale)
    :meth:`sample_factors` draws the two indices jointly from

        p(i, j) ∝ exp(−(i/(|a| − 1) − j/(|b| − 1))² / (2 σ²)),

    the indices rescaled to [0, 1]: small ``sigma`` puts the mass near the diagonal (the shape
    moves along the main diagonal of the image; squares come small, hearts large), ``sigma=math.inf``
    gives back independent factors. Factors in no pair stay uniform and independent.

    The grid, rendering and index ↔ factors are those of :class:`DSprites`: ``ds[i]`` is still grid
    point ``i``. To train on the correlated distribution, sample indices with
    ``torch.utils.data.WeightedRandomSampler(ds.sampling_weights(), num_samples)``.
    """

    def __init__(self, pairs=(("position_x", "position_y"), ("shape", "scale")), sigma: float = 0.2):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0 (math.inf for independent factors), got {sigma!r}")
        self.sigma = float(sigma)
        self.pairs = self._check_pairs(pairs)

    def _check_pairs(self, pairs) -> tuple[tuple[int, int], ...]:
        """``pairs`` as factor positions, each factor in at most one pair; ValueError naming ``pairs``."""
        checked, used = [], set()
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"pairs must hold pairs of factor names, got {pair!r}")
            for name in pair:
                if name not in self.factor_names:
                    raise ValueError(f"pairs: unknown factor {name!r}; choose from {', '.join(self.factor_names)}")
                if name in used:
                    raise ValueError(f"pairs: factor {name!r} appears twice; each factor may be in one pair only")
                used.add(name)
            checked.append((self.factor_names.index(pair[0]), self.factor_names.index(pair[1])))
        return tuple(checked)

    def pair_table(self, a: int, b: int) -> torch.Tensor:
        """Joint probabilities ``[size_a, size_b]`` float64 of the pair of factors (a, b)."""
        position_a = torch.arange(self.factor_sizes[a], dtype=torch.float64) / max(self.factor_sizes[a] - 1, 1)
        position_b = torch.arange(self.factor_sizes[b], dtype=torch.float64) / max(self.factor_sizes[b] - 1, 1)
        table = torch.exp(-((position_a[:, None] - position_b[None, :]) ** 2) / (2 * self.sigma**2))
        return table / table.sum()

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` factor vectors ``[n, 5]`` int64, pairs drawn from their joint tables, the rest uniform (CPU)."""
        factors = super().sample_factors(n, generator)
        if n == 0:
            return factors
        for a, b in self.pairs:
            table = self.pair_table(a, b)
            cell = torch.multinomial(table.reshape(-1), n, replacement=True, generator=generator)
            factors[:, a], factors[:, b] = cell // table.shape[1], cell % table.shape[1]
        return factors

    def sampling_weights(self) -> torch.Tensor:
        """Probability ``[len(self)]`` float64 of each grid index under :meth:`sample_factors`' distribution."""
        weights = torch.full(self.factor_sizes, 1.0 / len(self), dtype=torch.float64)
        for a, b in self.pairs:
            # The uniform weight already holds 1/(|a|·|b|) for the pair: replace it by the joint table.
            table = self.pair_table(a, b) * (self.factor_sizes[a] * self.factor_sizes[b])
            if a > b:
                a, b, table = b, a, table.T
            shape = [1] * self.num_factors
            shape[a], shape[b] = self.factor_sizes[a], self.factor_sizes[b]
            weights = weights * table.reshape(shape)
        return weights.reshape(-1)
