"""Drop-in losses (``nn.Module``) built on the fused ops.

The vector quantisers (``aelearn.layers``) are here too: their output carries the VQ-VAE loss.
"""

from aelearn.losses.hsic import HSICLoss
from aelearn.losses.mmd import MMDLoss, mmd_to_prior
from aelearn.layers.vector_quantizer import ResidualVectorQuantizer, VectorQuantizer
from aelearn.losses.total_correlation import BetaTCLoss, TotalCorrelationLoss

__all__ = [
    "BetaTCLoss",
    "HSICLoss",
    "MMDLoss",
    "ResidualVectorQuantizer",
    "TotalCorrelationLoss",
    "VectorQuantizer",
    "mmd_to_prior",
]
