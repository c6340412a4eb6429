"""Drop-in losses (``nn.Module``) built on the fused ops."""

from aelearn.losses.hsic import HSICLoss
from aelearn.losses.mmd import MMDLoss, mmd_to_prior
from aelearn.losses.total_correlation import BetaTCLoss, TotalCorrelationLoss

__all__ = ["BetaTCLoss", "HSICLoss", "MMDLoss", "TotalCorrelationLoss", "mmd_to_prior"]
