"""Nearest-codebook search of vector quantisation (VQ-VAE) and the code statistics of its EMA updates.

VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") maps every encoder
output z_n to its nearest codebook vector e_k:

    indices_n = argmin_k ‖z_n − e_k‖²,    sqdist_n = ‖z_n − e_{indices_n}‖².

Exactness: the distances that decide are those of float64 direct differences Σ_d (z_nd − e_kd)², with
ties to the lowest index (as torch.argmin and FAISS). The fused backends search with matrix-product
tiles of ‖e_k‖² − 2 z_n·e_k on data centred on the codebook mean — a GEMM with an argmin epilogue,
never an N×K matrix — keep the best and second-best score of every row, and certify the winner by a
rounding-error bound; the rare rows the bound cannot separate are searched again in float64. So the
result is the float64 argmin, not merely that of the cancellation-prone expansion. The contract is
in ``csrc/vq.cpp``.

``sqdist`` is differentiable in ``z`` and ``codebook`` (∂/∂z_n = 2(z_n − e_k), and minus that summed
into e_k); ``indices`` is not. Memory O(N·D) for the gradient, O(N + K·D) for the search.
"""

from __future__ import annotations

import torch

from aelearn import _ext
from aelearn.ops._backends import register_standard_backends
from aelearn.ops._kernels import check_finite, check_sample
from aelearn.ops import _registry

# sqdist is a float64 value rounded once to the input dtype: half an ulp.
TOLERANCES = {torch.float32: (0.0, 1e-6), torch.float64: (0.0, 1e-12)}

# The reference materialises [rows, K, D] float64 differences, this many elements at a time.
REFERENCE_CHUNK_ELEMENTS = 2**24

# vq_code_stats accumulates this many rows at a time in float64.
STATS_CHUNK_ROWS = 65_536


def reference_vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices ``[N]`` int64, sqdist ``[N]``) by float64 direct differences — the specification.

    ``z: [N, D]``, ``codebook: [K, D]``. d_nk = Σ_d (z_nd − e_kd)² in float64; indices_n is its
    argmin over k (the first minimum), sqdist_n = d_{n, indices_n} in the dtype of ``z``.
    Not differentiable by itself (:func:`vq_nearest` adds the gradient).
    """
    z64, codes64 = z.detach().double(), codebook.detach().double()
    rows_per_chunk = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, codebook.numel()))
    indices, sqdist = [], []
    for chunk in z64.split(rows_per_chunk):
        distances = (chunk[:, None, :] - codes64[None]).pow(2).sum(-1)
        best = distances.argmin(1)
        indices.append(best)
        sqdist.append(distances.gather(1, best[:, None])[:, 0])
    if not indices:
        return z.new_empty(0, dtype=torch.int64), z.new_empty(0)
    return torch.cat(indices), torch.cat(sqdist).to(z.dtype)


def _check_inputs(z, codebook) -> None:
    check_sample("z", z)
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
        shape = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
        raise ValueError(f"codebook must be a 2-D tensor of shape [num_codes, dim], got {shape}")
    if not codebook.is_floating_point():
        raise TypeError(f"codebook must be a floating-point tensor, got dtype {codebook.dtype}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code, got shape (0, D)")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(
            f"codebook must have the dimension of z ({z.shape[1]}), got codebook of shape {tuple(codebook.shape)}"
        )
    if codebook.dtype != z.dtype:
        raise TypeError(f"codebook must have the dtype of z ({z.dtype}), got {codebook.dtype}")
    if codebook.device != z.device:
        raise ValueError(f"codebook must be on z's device ({z.device}), got {codebook.device}")
    check_finite("z", z)
    check_finite("codebook", codebook)


class _VQNearestFunction(torch.autograd.Function):
    """Runs the search on a backend; the gradient of sqdist is a gather and an index_add."""

    @staticmethod
    def forward(ctx, z, codebook, impl):
        indices, sqdist = impl.forward(z, codebook)
        # A copy of the (small) codebook: layers update theirs in place before the backward runs.
        ctx.save_for_backward(z, codebook.clone(), indices)
        ctx.mark_non_differentiable(indices)
        return indices, sqdist

    @staticmethod
    def backward(ctx, grad_indices, grad_sqdist):
        z, codebook, indices = ctx.saved_tensors
        weighted = 2.0 * grad_sqdist[:, None] * (z - codebook[indices])
        grad_z = weighted if ctx.needs_input_grad[0] else None
        grad_codebook = None
        if ctx.needs_input_grad[1]:
            grad_codebook = torch.zeros_like(codebook).index_add_(0, indices, weighted, alpha=-1.0)
        return grad_z, grad_codebook, None


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code of every row: (indices ``[N]`` int64, sqdist ``[N]`` in the dtype of ``z``).

    ``z: [N, D]`` (N ≥ 0), ``codebook: [K, D]`` (K ≥ 1), same floating dtype and device, finite.
    ``indices`` is the float64 argmin of ‖z_n − e_k‖² with ties to the lowest index; ``sqdist`` the
    exact squared distance to that code, differentiable in ``z`` and ``codebook``.
    """
    _check_inputs(z, codebook)
    z, codebook = z.contiguous(), codebook.contiguous()
    impl = _registry.select("vq_nearest", z.device, z.dtype, z, codebook, backend=backend)
    return _VQNearestFunction.apply(z, codebook, impl)


def vq_code_stats(z: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts ``[K]`` int64 and sums of the assigned rows ``[K, D]`` float64 (a segment sum).

    ``z: [N, D]``, ``indices: [N]`` integer codes in [0, num_codes). No one-hot: counts by bincount,
    sums by index_add over chunks of rows, accumulated in float64 (so a code that takes millions of
    rows keeps its mean to float64 precision). Deterministic on the CPU.
    """
    check_sample("z", z)
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or len(indices) != len(z):
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a 1-D tensor with one code per row of z ({len(z)}), got {shape}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32 or int64 tensor, got dtype {indices.dtype}")
    if indices.device != z.device:
        raise ValueError(f"indices must be on z's device ({z.device}), got {indices.device}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= num_codes):
        raise ValueError(
            f"indices must lie in [0, {num_codes}), got values in [{int(indices.min())}, {int(indices.max())}]"
        )
    indices = indices.long()
    counts = torch.bincount(indices, minlength=num_codes)
    sums = torch.zeros(num_codes, z.shape[1], dtype=torch.float64, device=z.device)
    for rows, codes in zip(z.detach().split(STATS_CHUNK_ROWS), indices.split(STATS_CHUNK_ROWS)):
        sums.index_add_(0, codes, rows.double())
    return counts, sums


register_standard_backends(
    "vq_nearest",
    reference=reference_vq_nearest,
    forward="vq_nearest",
    backward=None,
    module="vq",
    tolerances=TOLERANCES,
)


def _register_fake_kernels() -> None:
    """Shapes of the extension's outputs for torch.compile and FakeTensor tracing."""

    @torch.library.register_fake("aelearn::vq_nearest")
    def _(z, codebook):
        return z.new_empty(z.shape[0], dtype=torch.int64), z.new_empty(z.shape[0])


if _ext.extension() is not None:
    _register_fake_kernels()
