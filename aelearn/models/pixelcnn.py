"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders")
with cached autoregressive decoding (Ramachandran et al. 2017).

The model factorises p(x) = Π_i p(x_i | x_<i) over pixels in raster order and, within a pixel, over
channels (R, then G given R, then B given R and G). Every image channel's value (a level in
[0, levels)) is embedded by a learned table of ``embed_dim`` features; then ``num_layers`` gated
layers, each with

- a vertical stack: a convolution over the rows above (layer 0: rows i − k//2 .. i − 1; later
  layers: rows i − k//2 .. i of the previous vertical stack), so row i of the vertical stack sees
  exactly the rows above i, all columns within reach — no blind spot;
- a horizontal stack: a 1 × (k//2 + 1) convolution over the current row up to the current column,
  plus a 1×1 link from the same layer's vertical stack, a gated activation tanh(a) ⊙ σ(b), a 1×1
  residual (from layer 1 on) and a 1×1 skip connection;
- optional conditioning added to both stacks' pre-activations: a vector ``cond [N, cond_dim]``
  (class, code z; a linear map per layer and stack) and a spatial map ``cond_map [N, cond_channels,
  H, W]`` (a decoder feature map, as in PixelVAE; a 1×1 convolution per layer and stack).

The output head is relu → 1×1 → relu → 1×1 over the sum of the skips: one Bernoulli logit per
channel (``output="binary"``) or ``levels`` logits per channel (``output="categorical"``: 256 for
8-bit images, K for a VQ-VAE code map). Channel order within a pixel is enforced by masks on the
current-column taps and the 1×1 maps of the horizontal path: features come in one group per image
channel; output group c sees input groups < c at the current pixel (mask A, layer 0) and hidden
groups ≤ c (mask B). ``receptive_field=r`` (VLAE, Chen et al. 2017) keeps spatial kernels in the
first r // (k//2) layers only (the rest are 1×1), so a pixel depends on pixels at most r rows above
and r columns to either side.

Training is teacher forcing; ``loss`` returns bits per dimension. Decoding: :meth:`PixelCNN.sample`
with ``method="naive"`` (the whole network per channel of every pixel, the reference) or
``method="cached"``: per row the vertical stack of that row for all layers (one small convolution
over a band of rows per layer), per pixel and channel the horizontal chain at that column only — the
op :func:`aelearn.ops.pixelcnn.pixelcnn_step` with cpp / numba / triton / cuda kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aelearn.models.base import Model, split_batch
from aelearn.ops import _registry
from aelearn.ops.pixelcnn import StepWeights, check_step_inputs

OUTPUTS = ("binary", "categorical")
SAMPLING_METHODS = ("naive", "cached")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")
    return value


def _groups(size: int, num_groups: int) -> torch.Tensor:
    """The image channel each of ``size`` features belongs to (equal consecutive blocks)."""
    return torch.arange(size) // (size // num_groups)


def _channel_mask(out_groups: torch.Tensor, in_groups: torch.Tensor, strict: bool) -> torch.Tensor:
    """``[out, in]``: 1 where output group g may see input group h at the current pixel (h < g for
    mask A, h ≤ g for mask B)."""
    allowed = out_groups[:, None] > in_groups[None, :] if strict else out_groups[:, None] >= in_groups[None, :]
    return allowed.float()


def gate(a: torch.Tensor) -> torch.Tensor:
    """Gated activation tanh(a[:C]) ⊙ σ(a[C:]) over dim 1 (``[N, 2C, ...] -> [N, C, ...]``)."""
    value, gate_logit = a.chunk(2, dim=1)
    return torch.tanh(value) * torch.sigmoid(gate_logit)


class PixelCNN(Model):
    """Gated PixelCNN over images ``image_shape = (C, H, W)`` of integer levels (module docstring).

    Arguments: ``num_layers`` gated layers of ``channels`` features (divisible by C);
    ``output``: "binary" (levels 2) or "categorical" with ``levels`` values per channel;
    ``cond_dim`` / ``cond_channels``: vector / spatial conditioning; ``receptive_field``: window in
    pixels (a multiple of k//2), None for unlimited; ``kernel_size`` k (odd ≥ 3); ``embed_dim``:
    features per image channel's embedded value (default channels // C); ``num_classes``: condition
    on class labels from the batch (one-hot, cond_dim = num_classes), taken from column
    ``label_factor`` when the batch carries factors ``[N, F]``.

    ``forward(x, cond=None, cond_map=None) -> logits``: ``x [N, C, H, W]`` levels (int, or floats in
    [0, 1] on the grid of ``levels``), logits ``[N, C, H, W]`` (binary) or ``[N, C, levels, H, W]``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        num_layers: int = 12,
        channels: int = 64,
        output: str = "binary",
        levels: int | None = None,
        cond_dim: int | None = None,
        cond_channels: int | None = None,
        receptive_field: int | None = None,
        kernel_size: int = 3,
        embed_dim: int | None = None,
        num_classes: int | None = None,
        label_factor: int = 0,
    ):
        super().__init__()
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)!r}")
        self.image_shape = tuple(_positive_int("image_shape", int(v)) for v in image_shape)
        image_channels = self.image_shape[0]
        self.num_layers = _positive_int("num_layers", num_layers)
        self.channels = _positive_int("channels", channels)
        if channels % image_channels:
            raise ValueError(f"channels must be divisible by the image's channel count {image_channels}, got {channels}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.output = output
        if output == "binary":
            if levels not in (None, 2):
                raise ValueError(f"output='binary' has 2 levels, got levels={levels!r}")
            self.levels = 2
        else:
            self.levels = _positive_int("levels", 256 if levels is None else levels, minimum=2)
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"kernel_size must be an odd int ≥ 3, got {kernel_size!r}")
        self.kernel_size = _positive_int("kernel_size", kernel_size, minimum=3)
        half = kernel_size // 2
        if receptive_field is None:
            self.spatial_layers = self.num_layers
        else:
            _positive_int("receptive_field", receptive_field)
            if receptive_field % half or receptive_field // half > self.num_layers:
                raise ValueError(
                    f"receptive_field must be a multiple of kernel_size // 2 = {half} up to num_layers · {half} = "
                    f"{self.num_layers * half}, got {receptive_field}"
                )
            self.spatial_layers = receptive_field // half
        self.receptive_field = receptive_field
        if num_classes is not None:
            _positive_int("num_classes", num_classes, minimum=2)
            if cond_dim not in (None, num_classes):
                raise ValueError(f"cond_dim must equal num_classes ({num_classes}) when both are given, got {cond_dim}")
            cond_dim = num_classes
        self.num_classes = num_classes
        self.label_factor = label_factor
        self.cond_dim = None if cond_dim is None else _positive_int("cond_dim", cond_dim)
        self.cond_channels = None if cond_channels is None else _positive_int("cond_channels", cond_channels)
        self.embed_dim = _positive_int("embed_dim", channels // image_channels if embed_dim is None else embed_dim)

        c2 = 2 * channels
        features = image_channels * self.embed_dim
        self.embedding = nn.Parameter(torch.randn(image_channels, self.levels, self.embed_dim))
        self.vertical, self.horizontal, self.link, self.residual, self.skip = (nn.ModuleList() for _ in range(5))
        self.cond_vertical, self.cond_horizontal = nn.ModuleList(), nn.ModuleList()
        self.map_vertical, self.map_horizontal = nn.ModuleList(), nn.ModuleList()
        for layer in range(self.num_layers):
            inputs = features if layer == 0 else channels
            spatial = layer < self.spatial_layers
            height = (half if layer == 0 else half + 1) if spatial else 1
            self.vertical.append(nn.Conv2d(inputs, c2, (height, kernel_size if spatial else 1)))
            self.horizontal.append(nn.Conv2d(inputs, c2, (1, half + 1 if spatial else 1)))
            self.link.append(nn.Conv2d(channels, c2, 1, bias=False))
            self.residual.append(nn.Conv2d(channels, channels, 1))
            self.skip.append(nn.Conv2d(channels, channels, 1, bias=False))
            if self.cond_dim is not None:
                self.cond_vertical.append(nn.Linear(self.cond_dim, c2, bias=False))
                self.cond_horizontal.append(nn.Linear(self.cond_dim, c2, bias=False))
            if self.cond_channels is not None:
                self.map_vertical.append(nn.Conv2d(self.cond_channels, c2, 1, bias=False))
                self.map_horizontal.append(nn.Conv2d(self.cond_channels, c2, 1, bias=False))
        self.skip_bias = nn.Parameter(torch.zeros(channels))
        outputs = image_channels * (1 if output == "binary" else self.levels)
        self.head_hidden = nn.Conv2d(channels, channels, 1)
        self.head_out = nn.Conv2d(channels, outputs, 1)

        # Masks on the current-pixel taps: output group g sees input group < g (layer 0) or ≤ g.
        hidden_groups = _groups(channels, image_channels)
        pre_groups = torch.cat([hidden_groups, hidden_groups])
        self.register_buffer("mask_first", _channel_mask(pre_groups, _groups(features, image_channels), strict=True), persistent=False)
        self.register_buffer("mask_pre", _channel_mask(pre_groups, hidden_groups, strict=False), persistent=False)
        self.register_buffer("mask_hidden", _channel_mask(hidden_groups, hidden_groups, strict=False), persistent=False)
        self.register_buffer("mask_out", _channel_mask(_groups(outputs, image_channels), hidden_groups, strict=False), persistent=False)

    # ---- masked weights, shared by the full forward and the cached step ----

    def horizontal_weight(self, layer: int) -> torch.Tensor:
        """``[2C, in, 1, taps]``: the layer's horizontal taps, the current column's masked."""
        weight = self.horizontal[layer].weight
        mask = self.mask_first if layer == 0 else self.mask_pre
        return torch.cat([weight[..., :-1], weight[..., -1:] * mask[:, :, None, None]], dim=-1)

    def _masked_1x1(self, conv: nn.Conv2d, mask: torch.Tensor) -> torch.Tensor:
        return conv.weight * mask[:, :, None, None]

    # ---- inputs ----

    def levels_of(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Integer levels ``[N, C, H, W]`` int64 of images given as levels or as floats in [0, 1]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [N, C, H, W], got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"{name} must have shape [N, {', '.join(map(str, self.image_shape))}], got {list(x.shape)}")
        if x.is_floating_point():
            scaled = x.double() * (self.levels - 1)
            levels = scaled.round()
            if len(x) and float((scaled - levels).abs().max()) > 1e-3:
                raise ValueError(
                    f"{name} holds floats off the grid of {self.levels} levels in [0, 1] "
                    f"({'binarise the images first' if self.output == 'binary' else 'quantise them first'})"
                )
            x = levels
        elif x.is_complex():
            raise TypeError(f"{name} must hold integer levels or floats in [0, 1], got dtype {x.dtype}")
        x = x.long()
        if len(x) and (int(x.min()) < 0 or int(x.max()) >= self.levels):
            raise ValueError(f"{name} must hold levels in [0, {self.levels}), got values from {int(x.min())} to {int(x.max())}")
        return x

    def images_from_levels(self, levels: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] ``[N, C, H, W]`` of integer levels."""
        return levels.float() / (self.levels - 1)

    def embed(self, levels: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` levels → input features ``[N, C·embed_dim, H, W]`` (channel c's block c)."""
        tables = self.embedding[torch.arange(self.image_shape[0], device=levels.device)[None, :, None, None], levels]
        return tables.permute(0, 1, 4, 2, 3).flatten(1, 2)

    def _check_cond(self, cond, cond_map, n: int, reference: torch.Tensor) -> None:
        if self.cond_dim is None and cond is not None:
            raise ValueError("cond given, but the model was built without cond_dim")
        if self.cond_dim is not None:
            if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (n, self.cond_dim):
                shape = list(cond.shape) if isinstance(cond, torch.Tensor) else cond
                raise ValueError(f"cond must be a tensor of shape [{n}, {self.cond_dim}], got {shape}")
        if self.cond_channels is None and cond_map is not None:
            raise ValueError("cond_map given, but the model was built without cond_channels")
        if self.cond_channels is not None:
            expected = (n, self.cond_channels, *self.image_shape[1:])
            if not isinstance(cond_map, torch.Tensor) or tuple(cond_map.shape) != expected:
                shape = list(cond_map.shape) if isinstance(cond_map, torch.Tensor) else cond_map
                raise ValueError(f"cond_map must be a tensor of shape {list(expected)}, got {shape}")
        for name, tensor in (("cond", cond), ("cond_map", cond_map)):
            if tensor is not None:
                if not tensor.is_floating_point():
                    raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
                if tensor.device != reference.device:
                    raise ValueError(f"{name} must be on the model's device ({reference.device}), got {tensor.device}")
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{name} contains NaN or Inf")

    def _conditioning(self, layer: int, cond, cond_map) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The (vertical, horizontal) conditioning terms of a layer: ``[N, 2C, 1 or H, 1 or W]`` or 0."""
        vertical, horizontal = 0.0, 0.0
        if cond is not None:
            vertical = self.cond_vertical[layer](cond)[:, :, None, None]
            horizontal = self.cond_horizontal[layer](cond)[:, :, None, None]
        if cond_map is not None:
            vertical = vertical + self.map_vertical[layer](cond_map)
            horizontal = horizontal + self.map_horizontal[layer](cond_map)
        return vertical, horizontal

    # ---- the two stacks, as functions of padded sources so that full maps and single rows share them ----

    def vertical_pad(self, layer: int) -> tuple[int, int, int, int]:
        """F.pad of a layer's vertical source: (left, right, top, bottom)."""
        if layer >= self.spatial_layers:
            return (0, 0, 0, 0)
        half = self.kernel_size // 2
        return (half, half, half, 0)

    def vertical_rows(self, layer: int, padded: torch.Tensor, first_row: int, rows: int, cond_term) -> torch.Tensor:
        """Vertical features ``[N, C, rows, W]`` of rows first_row .. first_row + rows − 1 from the
        padded source (row r of the output starts at padded row r)."""
        height = self.vertical[layer].weight.shape[2]
        band = padded[:, :, first_row : first_row + rows + height - 1]
        a = F.conv2d(band, self.vertical[layer].weight, self.vertical[layer].bias)
        if isinstance(cond_term, torch.Tensor) and cond_term.shape[2] > 1:
            cond_term = cond_term[:, :, first_row : first_row + rows]
        return gate(a + cond_term)

    def horizontal_input(self, layer: int, vertical: torch.Tensor, cond_term) -> torch.Tensor:
        """What the vertical stack and conditioning add to a layer's horizontal pre-activation."""
        return F.conv2d(vertical, self.link[layer].weight, self.horizontal[layer].bias) + cond_term

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, cond_map: torch.Tensor | None = None) -> torch.Tensor:
        levels = self.levels_of(x)
        reference = self.embedding
        self._check_cond(cond, cond_map, len(levels), reference)
        if levels.device != reference.device:
            raise ValueError(f"x must be on the model's device ({reference.device}), got {levels.device}")
        height = self.image_shape[1]
        source = horizontal = self.embed(levels)
        skip = 0.0
        for layer in range(self.num_layers):
            cond_v, cond_h = self._conditioning(layer, cond, cond_map)
            vertical = self.vertical_rows(layer, F.pad(source, self.vertical_pad(layer)), 0, height, cond_v)
            taps = self.horizontal[layer].weight.shape[-1]
            a = F.conv2d(F.pad(horizontal, (taps - 1, 0)), self.horizontal_weight(layer))
            g = gate(a + self.horizontal_input(layer, vertical, cond_h))
            update = F.conv2d(g, self._masked_1x1(self.residual[layer], self.mask_hidden), self.residual[layer].bias)
            horizontal = update if layer == 0 else horizontal + update
            skip = skip + F.conv2d(g, self._masked_1x1(self.skip[layer], self.mask_hidden))
            source = vertical
        hidden = torch.relu(F.conv2d(torch.relu(skip + self.skip_bias[:, None, None]), self._masked_1x1(self.head_hidden, self.mask_hidden), self.head_hidden.bias))
        logits = F.conv2d(hidden, self._masked_1x1(self.head_out, self.mask_out), self.head_out.bias)
        if self.output == "categorical":
            logits = logits.unflatten(1, (self.image_shape[0], self.levels))
        return logits

    # ---- likelihood ----

    def nll(self, x: torch.Tensor, cond=None, cond_map=None) -> torch.Tensor:
        """−log p(x) per image ``[N]`` in nats (float32 at least)."""
        levels = self.levels_of(x)
        logits = self(levels, cond, cond_map)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.output == "binary":
            per_dim = F.binary_cross_entropy_with_logits(logits, levels.to(logits.dtype), reduction="none")
        else:
            per_dim = F.cross_entropy(logits.transpose(1, 2), levels, reduction="none")
        return per_dim.flatten(1).sum(1)

    def bits_per_dim(self, x: torch.Tensor, cond=None, cond_map=None) -> torch.Tensor:
        """Mean −log₂ p(x) / (C·H·W) over the batch (0-dim)."""
        return self.nll(x, cond, cond_map).mean() / (math.prod(self.image_shape) * math.log(2))

    def _batch_cond(self, labels):
        if self.num_classes is None:
            return None
        if labels is None:
            raise ValueError("the model is class-conditional (num_classes): batches must carry labels")
        if labels.dim() == 2:
            labels = labels[:, self.label_factor]
        if labels.is_floating_point() or len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be integers in [0, {self.num_classes}), got {labels.min().item()} .. {labels.max().item()}")
        return F.one_hot(labels.long(), self.num_classes).to(self.embedding.dtype)

    def loss(self, batch, *, step: int = 0) -> dict[str, torch.Tensor]:
        """{"loss": bits per dimension, "nll": nats per image} of a batch (teacher forcing)."""
        x, labels = split_batch(batch)
        nll = self.nll(x, self._batch_cond(labels)).mean()
        return {"loss": nll / (math.prod(self.image_shape) * math.log(2)), "nll": nll}

    # ---- decoding ----

    def step_weights(self) -> StepWeights:
        """The masked weights in the layouts of :func:`aelearn.ops.pixelcnn.pixelcnn_step`
        (``[in, out]``; layers with 1×1 horizontal kernels padded with zero taps)."""
        taps = self.kernel_size // 2 + 1

        def taps_in_out(layer: int) -> torch.Tensor:
            weight = self.horizontal_weight(layer)[:, :, 0].permute(2, 1, 0)  # [taps_l, in, 2C]
            return F.pad(weight, (0, 0, 0, 0, taps - weight.shape[0], 0))

        def in_out(weight: torch.Tensor) -> torch.Tensor:
            return weight[:, :, 0, 0].t()

        hidden = [taps_in_out(layer) for layer in range(1, self.num_layers)]
        c2 = 2 * self.channels
        return StepWeights(
            w_in=taps_in_out(0).contiguous(),
            w_hidden=(torch.stack(hidden) if hidden else self.embedding.new_zeros(0, taps, self.channels, c2)).contiguous(),
            w_res=torch.stack([in_out(self._masked_1x1(conv, self.mask_hidden)) for conv in self.residual]).contiguous(),
            b_res=torch.stack([conv.bias for conv in self.residual]).contiguous(),
            w_skip=torch.stack([in_out(self._masked_1x1(conv, self.mask_hidden)) for conv in self.skip]).contiguous(),
            b_skip=self.skip_bias.contiguous(),
            w_out1=in_out(self._masked_1x1(self.head_hidden, self.mask_hidden)).contiguous(),
            b_out1=self.head_hidden.bias.contiguous(),
            w_out2=in_out(self._masked_1x1(self.head_out, self.mask_out)).contiguous(),
            b_out2=self.head_out.bias.contiguous(),
        )

    def _draw(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw of one channel: ``logits [n] (binary) or [n, levels]``, ``uniforms [n]``
        float64 in [0, 1) → levels ``[n]`` int64. In float64, so tiny logit differences between
        decoding methods change a draw only when a uniform falls within them of a CDF step."""
        if self.output == "binary":
            return (uniforms < torch.sigmoid(logits.double())).long()
        cdf = torch.softmax(logits.double(), dim=1).cumsum(1)
        return (cdf < (uniforms * cdf[:, -1])[:, None]).sum(1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        cond: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        method: str = "cached",
        backend: str | None = None,
        return_logits: bool = False,
    ):
        """``n`` images of levels ``[n, C, H, W]`` int64, drawn pixel by pixel in raster order and
        channel by channel within a pixel, one float64 uniform per image and channel from
        ``generator`` (so both methods consume the same numbers).

        ``method``: "naive" (full network per step) or "cached" (incremental; ``backend`` picks the
        step's kernel as for every op). ``return_logits``: also return the logits used at every
        step, ``[n, C, H, W]`` (binary) or ``[n, C, levels, H, W]``.
        """
        _positive_int("n", n, minimum=0)
        if method not in SAMPLING_METHODS:
            raise ValueError(f"method must be one of {', '.join(SAMPLING_METHODS)}, got {method!r}")
        reference = self.embedding
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != reference.device.type:
                raise ValueError(f"generator must be on the model's device ({reference.device}), got one on {generator.device}")
        self._check_cond(cond, cond_map, n, reference)
        if cond is not None:
            cond = cond.to(reference.dtype)
        if cond_map is not None:
            cond_map = cond_map.to(reference.dtype)
        decode = self._sample_naive if method == "naive" else self._sample_cached
        levels, logits = decode(n, cond, cond_map, generator, backend)
        return (levels, logits) if return_logits else levels

    def _logit_shape(self, n: int) -> tuple[int, ...]:
        channels, height, width = self.image_shape
        return (n, channels, height, width) if self.output == "binary" else (n, channels, self.levels, height, width)

    def _uniforms(self, n: int, generator) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64, device=self.embedding.device)

    def _sample_naive(self, n, cond, cond_map, generator, backend):
        if backend is not None:
            raise ValueError("backend applies to method='cached' only (the naive method runs the torch forward)")
        channels, height, width = self.image_shape
        levels = torch.zeros(n, *self.image_shape, dtype=torch.int64, device=self.embedding.device)
        logits_seen = self.embedding.new_zeros(self._logit_shape(n))
        for i in range(height):
            for j in range(width):
                for c in range(channels):
                    logits = self(levels, cond, cond_map)[:, c, ..., i, j]
                    logits_seen[:, c, ..., i, j] = logits
                    levels[:, c, i, j] = self._draw(logits, self._uniforms(n, generator))
        return levels, logits_seen

    def _sample_cached(self, n, cond, cond_map, generator, backend):
        channels, height, width = self.image_shape
        device, dtype = self.embedding.device, self.embedding.dtype
        weights = self.step_weights()
        embed_dim, c2 = self.embed_dim, 2 * self.channels
        levels = torch.zeros(n, *self.image_shape, dtype=torch.int64, device=device)
        logits_seen = self.embedding.new_zeros(self._logit_shape(n))
        # Padded vertical sources: the embedded image (layer 0's) and every layer's vertical stack.
        sources = [F.pad(self.embedding.new_zeros(n, channels * embed_dim, height, width), self.vertical_pad(0))]
        sources += [F.pad(self.embedding.new_zeros(n, self.channels, height, width), self.vertical_pad(layer)) for layer in range(1, self.num_layers)]
        conditioning = [self._conditioning(layer, cond, cond_map) for layer in range(self.num_layers)]
        h_row = self.embedding.new_zeros(self.num_layers, n, width, self.channels)
        v_row = self.embedding.new_zeros(self.num_layers, n, width, c2)
        x_row = self.embedding.new_zeros(n, width, channels * embed_dim)
        check_step_inputs(x_row, h_row, v_row, 0, weights)
        impl = _registry.select("pixelcnn_step", device, dtype, x_row, h_row, v_row, 0, *weights, backend=backend)
        for i in range(height):
            for layer in range(self.num_layers):
                cond_v, cond_h = conditioning[layer]
                vertical = self.vertical_rows(layer, sources[layer], i, 1, cond_v)
                if layer + 1 < self.num_layers:
                    left, _, top, _ = self.vertical_pad(layer + 1)
                    sources[layer + 1][:, :, top + i, left : left + width] = vertical[:, :, 0]
                if isinstance(cond_h, torch.Tensor) and cond_h.shape[2] > 1:
                    cond_h = cond_h[:, :, i : i + 1]
                v_row[layer] = self.horizontal_input(layer, vertical, cond_h)[:, :, 0].transpose(1, 2)
            x_row.zero_()
            for j in range(width):
                for c in range(channels):
                    logits, h_col = impl.forward(x_row, h_row, v_row, j, *weights)
                    logits = logits[:, c] if self.output == "binary" else logits[:, c * self.levels : (c + 1) * self.levels]
                    logits_seen[:, c, ..., i, j] = logits
                    drawn = self._draw(logits, self._uniforms(n, generator))
                    levels[:, c, i, j] = drawn
                    x_row[:, j, c * embed_dim : (c + 1) * embed_dim] = self.embedding[c, drawn]
                h_row[:, :, j] = h_col
            left, _, top, _ = self.vertical_pad(0)
            sources[0][:, :, top + i, left : left + width] = x_row.transpose(1, 2)
        return levels, logits_seen

    def extra_repr(self) -> str:
        field = "unlimited" if self.receptive_field is None else self.receptive_field
        return (
            f"image_shape={self.image_shape}, output={self.output!r}, levels={self.levels}, "
            f"receptive_field={field}, cond_dim={self.cond_dim}, cond_channels={self.cond_channels}"
        )
