"""Reusable modules with state."""

from aelearn.layers.vector_quantizer import ResidualVectorQuantizer, VectorQuantizer, VQOutput

__all__ = ["ResidualVectorQuantizer", "VQOutput", "VectorQuantizer"]
