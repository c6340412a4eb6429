"""Decoder likelihoods p(x | z): the reconstruction term of a VAE and the image a decoder means.

A likelihood turns the decoder's output ``[N, C, H, W]`` (one value per pixel and channel) into
``nll(output, x) -> [N]`` (−log p(x | z) summed over pixels, in nats) and ``mean(output)``, the
image shown in reconstructions and samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Bernoulli(nn.Module):
    """Independent Bernoulli pixels with logits from the decoder; x in [0, 1].

    For grey levels between 0 and 1 this is the usual cross-entropy reconstruction loss of
    disentanglement_lib ("bernoulli"), not a normalised density.
    """

    def nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


class Gaussian(nn.Module):
    """Independent Gaussian pixels N(x; μ, σ²) with μ from the decoder and one σ for all pixels:
    fixed (``sigma``), or learned from ``sigma`` as its initial value (``learn_sigma``, the σ-VAE of
    Rybkin et al. 2021). σ sets the weight of reconstruction against the KL term."""

    def __init__(self, sigma: float = 0.1, learn_sigma: bool = False):
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0.0 < sigma < math.inf):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        log_sigma = torch.tensor(math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def nll(self, mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        log_sigma = self.log_sigma.to(torch.float32)
        squared = ((x - mean.float()) * torch.exp(-log_sigma)).square()
        return (0.5 * squared + log_sigma + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    def mean(self, mean: torch.Tensor) -> torch.Tensor:
        return mean

    def extra_repr(self) -> str:
        learned = isinstance(self.log_sigma, nn.Parameter)
        return f"sigma={math.exp(float(self.log_sigma)):.4g}, learn_sigma={learned}"


LIKELIHOODS = {"bernoulli": Bernoulli, "gaussian": Gaussian}
