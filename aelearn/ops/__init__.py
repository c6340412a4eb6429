"""Ops with a pure-PyTorch reference and fused backends, selected per call (see ``_registry``).

Note: ``aelearn.ops.mmd`` is the function; its module is ``aelearn.ops.mmd`` in ``sys.modules``
(``from aelearn.ops.mmd import reference_pair_sums`` works as usual).
"""

from aelearn.ops._registry import BackendUnavailableError, backends, explain, use_backend
from aelearn.ops.mmd import median_heuristic, mmd, reference_mmd

__all__ = ["BackendUnavailableError", "backends", "explain", "median_heuristic", "mmd", "reference_mmd", "use_backend"]
