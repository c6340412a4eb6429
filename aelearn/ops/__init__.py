"""Ops with a pure-PyTorch reference and fused backends, selected per call (see ``_registry``).

Note: ``aelearn.ops.mmd`` is the function; its module is ``aelearn.ops.mmd`` in ``sys.modules``
(``from aelearn.ops.mmd import reference_pair_sums`` works as usual); likewise ``hsic`` and ``log_qz``.
The vector-quantisation search lives in ``aelearn.ops.vq``, the step of cached PixelCNN decoding in
``aelearn.ops.pixelcnn``.
"""

from aelearn.ops._registry import BackendUnavailableError, backends, explain, use_backend
from aelearn.ops.hsic import hsic, hsic_groups, reference_hsic
from aelearn.ops.log_qz import TCDecomposition, log_qz, tc_decomposition, total_correlation
from aelearn.ops.mmd import median_heuristic, mmd, reference_mmd
from aelearn.ops.pixelcnn import StepWeights, pixelcnn_step, reference_pixelcnn_step
from aelearn.ops.vq import reference_vq_nearest, vq_code_stats, vq_nearest

__all__ = [
    "BackendUnavailableError",
    "StepWeights",
    "TCDecomposition",
    "backends",
    "explain",
    "hsic",
    "hsic_groups",
    "log_qz",
    "median_heuristic",
    "mmd",
    "pixelcnn_step",
    "reference_hsic",
    "reference_mmd",
    "reference_pixelcnn_step",
    "reference_vq_nearest",
    "tc_decomposition",
    "total_correlation",
    "use_backend",
    "vq_code_stats",
    "vq_nearest",
]
