"""aelearn: autoencoder-based representation learning with fused, memory-linear kernels."""

from aelearn import layers, ops
from aelearn.ops._registry import BackendUnavailableError, backends, use_backend

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "backends", "layers", "ops", "use_backend", "__version__"]
