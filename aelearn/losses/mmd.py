"""MMD as a loss: between two batches, or between a batch of codes and the prior (InfoVAE, WAE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aelearn.ops.mmd import mmd

# WAE's multi-scale IMQ kernel for an N(0, σ²I) prior: c = 2·d·σ²·s summed over these s
# (Tolstikhin et al. 2018, "Wasserstein Auto-Encoders", §4 and their released experiments).
WAE_IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class MMDLoss(nn.Module):
    """``loss(x, y)`` = MMD²(x, y) with ``x: [n, d]``, ``y: [m, d]``; arguments as :func:`aelearn.ops.mmd`."""

    def __init__(
        self,
        kernel: str = "rbf",
        bandwidths: float | Sequence[float] | None = None,
        estimator: str = "unbiased",
        backend: str | None = None,
    ):
        super().__init__()
        self.kernel = kernel
        self.bandwidths = bandwidths
        self.estimator = estimator
        self.backend = backend

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mmd(x, y, kernel=self.kernel, bandwidths=self.bandwidths, estimator=self.estimator, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, bandwidths={self.bandwidths!r}, estimator={self.estimator!r}, backend={self.backend!r}"


def mmd_to_prior(
    z: torch.Tensor,
    prior: str | torch.Tensor = "normal",
    generator: torch.Generator | None = None,
    *,
    kernel: str = "imq",
    bandwidths: float | Sequence[float] | None = None,
    estimator: str = "unbiased",
    backend: str | None = None,
) -> torch.Tensor:
    """MMD² between codes ``z: [n, d]`` and the prior, the penalty of InfoVAE and WAE-MMD.

    ``prior="normal"`` draws n samples of N(0, I) with ``generator`` (on z's device); a tensor
    ``[m, d]`` is used as prior samples as it is. ``bandwidths=None`` means, for ``"imq"`` with the
    normal prior, WAE's scales c = 2·d·s over :data:`WAE_IMQ_SCALES`, and otherwise the median
    heuristic of :func:`aelearn.ops.mmd`.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor [n, d], got {getattr(z, 'shape', type(z).__name__)}")
    if isinstance(prior, torch.Tensor):
        samples = prior
    elif prior == "normal":
        if generator is not None and generator.device.type != z.device.type:
            raise ValueError(f"generator must be on z's device ({z.device}), got a generator on {generator.device}")
        samples = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        if kernel == "imq" and bandwidths is None:
            bandwidths = [2.0 * z.shape[1] * s for s in WAE_IMQ_SCALES]
    else:
        raise ValueError(f"prior must be 'normal' or a tensor of prior samples [m, d], got {prior!r}")
    return mmd(z, samples, kernel=kernel, bandwidths=bandwidths, estimator=estimator, backend=backend)
