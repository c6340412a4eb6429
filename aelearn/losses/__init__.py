"""Drop-in losses (``nn.Module``) built on the fused ops."""

from aelearn.losses.mmd import MMDLoss, mmd_to_prior

__all__ = ["MMDLoss", "mmd_to_prior"]
