"""Vector quantisation layers: VQ-VAE's quantiser and its residual stack.

:class:`VectorQuantizer` (van den Oord et al. 2017, "Neural Discrete Representation Learning"):
every D-dimensional vector of the input is replaced by its nearest code e_k (the fused
:func:`aelearn.ops.vq_nearest`), gradients pass straight through to the input, and the loss is

    commitment · ‖z − sg(e_k)‖²                      (codebook learned by EMA, the default)
    commitment · ‖z − sg(e_k)‖² + ‖sg(z) − e_k‖²     (codebook learned by gradient, ``ema_decay=None``)

averaged over all elements. The EMA update (the paper's Appendix A.1) keeps per code an
exponential moving average of its count N_k and of the sum m_k of the vectors assigned to it, and
sets e_k = m_k / Ñ_k with Laplace-smoothed counts Ñ_k = (N_k + ε) / (n + K·ε) · n, n = Σ_k N_k.

Also:
* k-means initialisation of the codebook from the first training batch (Lloyd iterations on the
  fused search and segment sums);
* dead-code revival: a code whose moving-average count falls below ``dead_code_threshold`` (vectors
  per batch) is replaced by a vector of the current batch (the random restarts of Dhariwal et al.
  2020, "Jukebox");
* under ``torch.distributed`` the statistics are all-reduced and the random choices made on rank 0
  and broadcast, so every replica keeps the same codebook;
* :class:`ResidualVectorQuantizer`: a stack of quantisers, each coding the residual the previous ones
  left (Zeghidour et al. 2021, "SoundStream").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from aelearn.ops.vq import vq_code_stats, vq_nearest


class VQOutput(NamedTuple):
    """What a quantiser returns.

    ``quantized``: the input's shape; values of the chosen codes, gradient straight through to the
    input. ``indices``: int64, the input's shape without the channel dimension (a last dimension of
    size Q for a residual stack of Q quantisers). ``loss``: 0-dim, the commitment (and codebook) loss.
    ``perplexity``: exp of the entropy of the batch's code frequencies; ``usage``: the fraction of
    codes that at least one vector of the batch chose; ``revived``: the number of codes replaced —
    0-dim tensors for one quantiser, ``[Q]`` for a stack.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    revived: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the replicas, in place; the identity outside torch.distributed."""
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def _fewest_over_replicas(count: int, device) -> int:
    """The smallest of ``count`` over the replicas (``count`` itself outside torch.distributed)."""
    value = torch.tensor(count, device=device)
    if _distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value)


def _from_rank_zero(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value on every replica, in place; the identity outside torch.distributed."""
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


class _StraightThrough(torch.autograd.Function):
    """The codes' values with the gradient of the identity to the input (exact values, unlike
    ``z + (codes − z).detach()``, which rounds)."""

    @staticmethod
    def forward(ctx, inputs, codes):
        return codes.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_fraction(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1){' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def _check_non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def _channels_last(z: torch.Tensor, channel_dim: int, dim: int) -> torch.Tensor:
    """``z`` with its channel dimension moved last, after the checks of a quantiser's input."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype}")
    if z.dim() == 0 or not -z.dim() <= channel_dim < z.dim():
        raise ValueError(f"z of shape {tuple(z.shape)} has no dimension {channel_dim} (the channel_dim of this layer)")
    if z.shape[channel_dim] != dim:
        raise ValueError(
            f"z must have {dim} channels in dimension {channel_dim}, got shape {tuple(z.shape)}"
        )
    return z.movedim(channel_dim, -1)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of D-dimensional vectors with a codebook of K codes.

    ``num_codes`` K, ``dim`` D. ``commitment``: weight β of the commitment loss (0.25 in the paper).
    ``ema_decay``: decay γ of the EMA codebook update (0.99), or None to learn the codebook by
    gradient. ``epsilon``: Laplace smoothing ε of the EMA counts. ``kmeans_init``: run
    ``kmeans_iters`` Lloyd iterations on the first training batch to initialise the codebook.
    ``dead_code_threshold``: revive codes whose moving-average count (vectors per batch, decayed by
    ``usage_decay`` when the codebook is learned by gradient) falls below it; 0 turns revival off.
    ``channel_dim``: the dimension of the input holding the D channels (-1 for ``[..., D]``, 1 for
    ``[B, C, H, W]``). ``backend``: the backend of the search (None: automatic).

    Every code starts with a pseudo-count of one at its initial position (at least; k-means counts
    its cluster), so the EMA ratio is defined from the first step. Search and statistics run in the
    codebook's dtype (float32 by default; a half-precision input is searched in float32). Only
    training mode updates the codebook; ``forward`` in eval mode reads it.

    ``forward(z) -> VQOutput`` (see :class:`VQOutput`).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        commitment: float = 0.25,
        ema_decay: float | None = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        usage_decay: float = 0.99,
        channel_dim: int = -1,
        backend: str | None = None,
    ):
        super().__init__()
        self.num_codes = _check_positive_int("num_codes", num_codes)
        self.dim = _check_positive_int("dim", dim)
        self.commitment = _check_non_negative("commitment", commitment)
        self.ema_decay = _check_fraction("ema_decay", ema_decay, allow_none=True)
        self.epsilon = _check_non_negative("epsilon", epsilon)
        self.kmeans_iters = _check_positive_int("kmeans_iters", kmeans_iters)
        self.dead_code_threshold = _check_non_negative("dead_code_threshold", dead_code_threshold)
        self.usage_decay = _check_fraction("usage_decay", usage_decay)
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
        self.channel_dim = channel_dim
        self.backend = backend

        # Unit-variance codes (as nn.Embedding), replaced by k-means on the first batch if asked.
        codebook = torch.randn(num_codes, dim)
        if self.ema_decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def extra_repr(self) -> str:
        learned = "gradient" if self.ema_decay is None else f"ema_decay={self.ema_decay}"
        return f"num_codes={self.num_codes}, dim={self.dim}, commitment={self.commitment}, {learned}, channel_dim={self.channel_dim}"

    def forward(self, z: torch.Tensor) -> VQOutput:
        z_last = _channels_last(z, self.channel_dim, self.dim)
        flat = z_last.reshape(-1, self.dim)
        codes, indices, loss, counts, revived = self.quantize_flat(flat)
        quantized = _StraightThrough.apply(flat, codes.detach()).reshape(z_last.shape).movedim(-1, self.channel_dim)
        perplexity, usage = code_usage(counts)
        return VQOutput(quantized, indices.reshape(z_last.shape[:-1]), loss, perplexity, usage, revived)

    def quantize_flat(self, flat: torch.Tensor):
        """Codes ``[N, D]`` (differentiable in the codebook when it is learned by gradient), indices
        ``[N]``, loss, the batch's code counts ``[K]`` (over every replica while training) and the
        number of revived codes, for ``flat: [N, D]``; updates the codebook in training mode."""
        search_dtype = self.codebook.dtype
        vectors = flat.to(search_dtype)
        if self.training and not bool(self.initialized):
            self._kmeans_init(vectors.detach())
        indices, sqdist = vq_nearest(vectors, self.codebook.detach(), backend=self.backend)
        codes = self.codebook[indices]
        elements = max(1, vectors.numel())
        loss = self.commitment * sqdist.sum() / elements
        if self.ema_decay is None:
            loss = loss + (codes - vectors.detach()).pow(2).sum() / elements
        if self.training:
            with torch.no_grad():
                counts = self._update(vectors.detach(), indices)
                revived = self._revive_dead_codes(vectors.detach())
        else:
            counts = torch.bincount(indices, minlength=self.num_codes)
            revived = torch.zeros((), dtype=torch.int64, device=flat.device)
        return codes, indices, loss.to(flat.dtype), counts, revived

    @torch.no_grad()
    def _update(self, vectors: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Moving averages of the counts (and, with EMA, of the sums and the codebook); the counts."""
        counts, sums = vq_code_stats(vectors, indices, self.num_codes)
        counts = _all_reduce(counts.double())
        decay = self.usage_decay if self.ema_decay is None else self.ema_decay
        self.cluster_size.mul_(decay).add_(counts.to(self.cluster_size.dtype), alpha=1.0 - decay)
        if self.ema_decay is not None:
            sums = _all_reduce(sums)
            self.embed_sum.mul_(decay).add_(sums.to(self.embed_sum.dtype), alpha=1.0 - decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        return counts

    @torch.no_grad()
    def _kmeans_init(self, vectors: torch.Tensor) -> None:
        """Lloyd's k-means over the first batch of every replica, seeded by rank 0's vectors."""
        if _fewest_over_replicas(len(vectors), vectors.device) == 0:
            raise ValueError("z must hold at least one vector on every replica to initialise the codebook by k-means")
        centroids = _from_rank_zero(self._kmeans_plus_plus_seeds(vectors))
        counts = torch.zeros(self.num_codes, dtype=torch.float64, device=vectors.device)
        for _ in range(self.kmeans_iters):
            indices, _ = vq_nearest(vectors, centroids, backend=self.backend)
            counts, sums = vq_code_stats(vectors, indices, self.num_codes)
            counts, sums = _all_reduce(counts.double()), _all_reduce(sums)
            filled = counts > 0
            # An empty cluster keeps its centroid.
            centroids[filled] = (sums[filled] / counts[filled, None]).to(centroids.dtype)
        self.codebook.copy_(centroids)
        self.cluster_size.copy_(counts.clamp_min(1.0))
        self.embed_sum.copy_(centroids * self.cluster_size[:, None])
        self.initialized.fill_(True)

    def _kmeans_plus_plus_seeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """K seeds from ``vectors`` by D² sampling (Arthur & Vassilvitskii 2007, "k-means++") in
        rounds that double the number of seeds (as k-means|| does, Bahmani et al. 2012): each round
        draws as many new seeds as there are, without replacement, with probability ∝ the squared
        distance to the nearest seed so far. log2(K) rounds whose searches add up to one search of
        the batch against K codes. When fewer than K vectors are distinct, the rest are drawn
        uniformly (duplicates, which revival later replaces)."""
        first = torch.randint(len(vectors), (1,), device=vectors.device)
        seeds = [vectors[first]]
        sqdist = vq_nearest(vectors, seeds[0], backend=self.backend)[1].double()
        count = 1
        while count < self.num_codes:
            wanted = min(count, self.num_codes - count)
            candidates = int((sqdist > 0).sum())
            if candidates == 0:
                picks = torch.randint(len(vectors), (self.num_codes - count,), device=vectors.device)
            else:
                picks = torch.multinomial(sqdist, min(wanted, candidates), replacement=False)
            seeds.append(vectors[picks])
            count += len(picks)
            if count < self.num_codes:
                sqdist = torch.minimum(sqdist, vq_nearest(vectors, seeds[-1], backend=self.backend)[1].double())
        return torch.cat(seeds)

    @torch.no_grad()
    def _revive_dead_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Replace codes used less than the threshold by vectors of the batch; how many were replaced.

        Rank 0 draws the replacements from its batch (distinct vectors, as many as it has — the
        lowest-numbered dead codes first when there are more dead codes than vectors).
        """
        zero = torch.zeros((), dtype=torch.int64, device=vectors.device)
        if self.dead_code_threshold == 0.0:
            return zero
        dead = torch.nonzero(self.cluster_size < self.dead_code_threshold).flatten()
        dead = dead[: _fewest_over_replicas(len(vectors), vectors.device)]
        if len(dead) == 0:
            return zero
        chosen = torch.randperm(len(vectors), device=vectors.device)[: len(dead)]
        replacements = _from_rank_zero(vectors[chosen].to(self.codebook.dtype).clone())
        self.codebook[dead] = replacements
        self.cluster_size[dead] = self.dead_code_threshold
        self.embed_sum[dead] = replacements * self.dead_code_threshold
        return torch.tensor(len(dead), device=vectors.device)


def code_usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, usage) of code counts ``[K]``: exp of the entropy of the frequencies, and the
    fraction of codes with a non-zero count (both 0-dim float tensors; 0 and 0 for no vectors)."""
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return counts.new_zeros(()).float(), counts.new_zeros(()).float()
    p = counts[counts > 0] / total
    return torch.exp(-(p * p.log()).sum()).float(), (counts > 0).double().mean().float()


class ResidualVectorQuantizer(nn.Module):
    """A stack of ``num_quantizers`` quantisers: quantiser q codes what the previous ones left over.

    r_1 = z, c_q = VQ_q(r_q), r_{q+1} = r_q − c_q; the output is Σ_q c_q with the gradient straight
    through to z, and the loss the sum of the quantisers' losses. The other keyword arguments are
    those of :class:`VectorQuantizer` and apply to every quantiser; ``channel_dim`` to the input.
    ``indices`` gain a last dimension of size Q; perplexity, usage and revived are ``[Q]``.
    """

    def __init__(self, num_quantizers: int, num_codes: int, dim: int, *, channel_dim: int = -1, **kwargs):
        super().__init__()
        _check_positive_int("num_quantizers", num_quantizers)
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
        self.dim = dim
        self.channel_dim = channel_dim
        self.quantizers = nn.ModuleList(VectorQuantizer(num_codes, dim, **kwargs) for _ in range(num_quantizers))

    def forward(self, z: torch.Tensor) -> VQOutput:
        z_last = _channels_last(z, self.channel_dim, self.dim)
        flat = z_last.reshape(-1, self.dim)
        residual = flat
        total = torch.zeros_like(flat)
        indices, losses, perplexities, usages, revived = [], [], [], [], []
        for quantizer in self.quantizers:
            # The residual stays differentiable in z (codes are subtracted detached), so every
            # quantiser's commitment loss trains the encoder.
            codes, index, loss, counts, count_revived = quantizer.quantize_flat(residual)
            codes = codes.to(flat.dtype)
            residual = residual - codes.detach()
            total = total + codes
            perplexity, usage = code_usage(counts)
            indices.append(index)
            losses.append(loss)
            perplexities.append(perplexity)
            usages.append(usage)
            revived.append(count_revived)
        quantized = _StraightThrough.apply(flat, total.detach())
        return VQOutput(
            quantized.reshape(z_last.shape).movedim(-1, self.channel_dim),
            torch.stack(indices, -1).reshape(*z_last.shape[:-1], len(self.quantizers)),
            torch.stack(losses).sum(),
            torch.stack(perplexities),
            torch.stack(usages),
            torch.stack(revived),
        )
