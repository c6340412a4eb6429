"""Information-theoretic building blocks of the metrics, each one batched over every column at once.

- :func:`discretize`: disentanglement_lib's histogram discretiser (``_histogram_discretize``) for all
  latents in a few elementwise passes.
- :func:`mutual_information`: the plug-in (histogram) mutual information between every column of
  ``a`` and every column of ``b`` from one joint count over all pairs, equal to
  ``sklearn.metrics.mutual_info_score`` pair by pair (see :mod:`aelearn.metrics._reference`);
  :func:`entropy` likewise.
- :func:`gaussian_total_correlation`: the total correlation of a Gaussian with the codes' sample
  covariance (Locatello et al. 2019's unsupervised score).
- :func:`active_units`: Burda et al. (2016)'s count of latents whose posterior mean varies with x.

Everything is computed in float64; integer inputs are labels of any int dtype and any values
(they are re-indexed per column), ``[N, D]`` with rows the data points.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Rows per joint-count chunk: the cell indices of one chunk hold rows · D · F int32.
_ROWS_PER_CHUNK = 16384
# Smallest 1 − R² of a latent on the others (in float64) that is not taken for linear dependence.
_DEPENDENCE_TOLERANCE = 1e-12


def _check_matrix(value, name: str, integer: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, columns], got shape {tuple(value.shape)}")
    is_integer = not (value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex)
    if integer and not is_integer:
        raise TypeError(f"{name} must have an integer dtype (labels), got {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(value.shape)}")
    if not integer and not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).any(0).nonzero().flatten().tolist()
        raise ValueError(f"{name} has NaN or Inf values in column(s) {bad}")
    return value.cpu()


def discretize(codes: torch.Tensor, num_bins: int = 20) -> torch.Tensor:
    """Bin every column of ``codes [N, D]`` into ``num_bins`` equal-width bins: int64 ``[N, D]`` in 1 … num_bins.

    Reproduces disentanglement_lib's ``_histogram_discretize`` exactly on float64 values (float32
    codes are widened first): the edges are ``np.histogram(column, num_bins)[1]``, i.e.
    ``np.linspace(min, max, num_bins + 1)`` (a constant column gets [v − 0.5, v + 0.5]), and the
    label is ``np.digitize(column, edges[:-1])``: the number of left edges ≤ the value, so the
    maximum lands in bin ``num_bins`` and nothing in bin 0.
    """
    codes = _check_matrix(codes, "codes", integer=False).double()
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int ≥ 1, got {num_bins!r}")
    low, high = codes.amin(0), codes.amax(0)
    constant = low == high
    low = torch.where(constant, low - 0.5, low)
    high = torch.where(constant, high + 0.5, high)
    # Left edge k is np.linspace's ``low + k · step`` (the last point, set to ``high`` exactly, is
    # never a left edge). The label is 1 + the largest k with edge_k ≤ x: estimate k by division,
    # then correct the estimate by one step either way against the edges computed as numpy does,
    # so values on or next to an edge fall as np.digitize puts them.
    step = (high - low) / num_bins
    k = ((codes - low) / step).floor().clamp_(0, num_bins - 1)
    k -= (codes < low + k * step).double()
    k += ((k + 1 < num_bins) & (codes >= low + (k + 1) * step)).double()
    return k.long() + 1


class _Labels(NamedTuple):
    """Columns as indices 0 … K_c − 1 (stored column-major), with per-column label counts stored ragged."""

    index: torch.Tensor  # [C, N] int64, column c in [0, K_c)
    sizes: torch.Tensor  # [C] int64, K_c
    offsets: torch.Tensor  # [C] int64, start of column c in ``counts``
    counts: torch.Tensor  # [Σ K_c] float64, occurrences of each index (0 for an unused one)
    constant: torch.Tensor  # [C] bool, the column takes a single value


def _index_labels(labels: torch.Tensor) -> _Labels:
    """Index the columns of ``labels [N, C]``; column-major, so that every later pass runs along
    contiguous rows of N (broadcasting over a short inner dimension is several times slower)."""
    labels = labels.T.long().contiguous()
    columns, rows = labels.shape
    low, high = labels.amin(1, keepdim=True), labels.amax(1, keepdim=True)
    index, sizes = labels - low, (high - low + 1).flatten()
    if int(sizes.sum()) > max(4 * rows, 1 << 16):
        # Sparse label values: number the distinct values of each column instead (one sort). The
        # columns are laid side by side, ``width`` keys apart, so each one is a contiguous block.
        width = int(sizes.max())
        keys = index + torch.arange(columns)[:, None] * width
        unique, inverse = torch.unique(keys, return_inverse=True)
        sizes = torch.bincount(torch.div(unique, width, rounding_mode="floor"), minlength=columns)
        index = inverse - (torch.cumsum(sizes, 0) - sizes)[:, None]
    # Labels in a compact range (bins, factor values) are used as they are: an unused value only
    # adds an empty row or column to the contingency tables.
    offsets = torch.cumsum(sizes, 0) - sizes
    counts = torch.bincount((index + offsets[:, None]).flatten(), minlength=int(sizes.sum())).double()
    return _Labels(index, sizes, offsets, counts, (low == high).flatten())


def _joint_counts(la: _Labels, lb: _Labels, table_offsets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-empty cells of every pair's contingency table: (flat cell indices, counts) over all pairs.

    Cell (i, j) of pair (d, f) is ``table_offsets[d, f] + i · K_f + j``. Up to a few cells per row
    and pair the cells are counted with one dense ``bincount`` per chunk of rows; beyond (labels
    with very many distinct values), with one sort of the cells.
    """
    rows = la.index.shape[1]
    index_dtype = torch.int32 if total < 2**31 else torch.int64  # half the traffic of the O(N·D·F) pass
    index_a, index_b = la.index.to(index_dtype), lb.index.to(index_dtype)
    sizes_b, offsets = lb.sizes.to(index_dtype)[None, :, None], table_offsets.to(index_dtype)[:, :, None]

    def cells(start: int) -> torch.Tensor:
        chunk = index_a[:, None, start : start + _ROWS_PER_CHUNK] * sizes_b  # [D, F, rows]
        chunk += offsets
        chunk += index_b[None, :, start : start + _ROWS_PER_CHUNK]
        return chunk.flatten()

    if total <= max(2 * table_offsets.numel() * rows, 1 << 20):
        joint = torch.zeros(total, dtype=torch.int64)
        for start in range(0, rows, _ROWS_PER_CHUNK):
            joint += torch.bincount(cells(start), minlength=total)
        cell = joint.nonzero().flatten()
        return cell, joint[cell].double()
    everything = torch.cat([cells(start).long() for start in range(0, rows, _ROWS_PER_CHUNK)])
    cell, counts = torch.unique(everything, return_counts=True)
    return cell, counts.double()


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plug-in mutual information in nats between every column of ``a [N, D]`` and of ``b [N, F]``: float64 ``[D, F]``.

    ``I(a_d; b_f) = Σ_ij (n_ij / N) log(N n_ij / (n_i n_j))`` over the non-empty cells of each
    pair's contingency table, as ``sklearn.metrics.mutual_info_score`` (0 for a constant column
    and clipped at 0 likewise). All D · F tables are counted together: cell (i, j) of pair (d, f)
    gets the flat index ``offset[d, f] + i · K_f + j`` (ragged, K the range of each column's
    labels), and one ``bincount`` per chunk of rows counts every pair, so the work is O(N · D · F)
    with no Python loop over pairs and memory O(rows per chunk · D · F + Σ K_d K_f).
    """
    a = _check_matrix(a, "a", integer=True)
    b = _check_matrix(b, "b", integer=True)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows, got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    la, lb = _index_labels(a), _index_labels(b)
    table_sizes = la.sizes[:, None] * lb.sizes[None, :]  # [D, F]
    flat_offsets = torch.cumsum(table_sizes.flatten(), 0) - table_sizes.flatten()
    cell, n_ij = _joint_counts(la, lb, flat_offsets.view_as(table_sizes), int(table_sizes.sum()))
    pair = torch.searchsorted(flat_offsets, cell, right=True) - 1
    num_b = lb.sizes.numel()
    d, f = torch.div(pair, num_b, rounding_mode="floor"), pair % num_b
    within = cell - flat_offsets[pair]
    i = torch.div(within, lb.sizes[f], rounding_mode="floor")
    j = within % lb.sizes[f]
    n_i = la.counts[la.offsets[d] + i]
    n_j = lb.counts[lb.offsets[f] + j]
    terms = n_ij / n * (torch.log(n_ij) + math.log(n) - torch.log(n_i) - torch.log(n_j))
    mi = torch.zeros(table_sizes.numel(), dtype=torch.float64).index_add_(0, pair, terms).view_as(table_sizes)
    # A constant column shares no information: exactly 0, not a rounding residue (as sklearn).
    mi[la.constant] = 0.0
    mi[:, lb.constant] = 0.0
    return mi.clamp_min(0.0)


def entropy(labels: torch.Tensor) -> torch.Tensor:
    """Plug-in entropy in nats of every column of ``labels [N, F]`` (integer): float64 ``[F]``.

    ``H(b_f) = −Σ_j (n_j / N) log(n_j / N)``, equal to ``mutual_info_score(b_f, b_f)`` (which
    disentanglement_lib's ``discrete_entropy`` calls).
    """
    labels = _check_matrix(labels, "labels", integer=True)
    indexed = _index_labels(labels)
    column = torch.repeat_interleave(torch.arange(labels.shape[1]), indexed.sizes)
    p = indexed.counts / labels.shape[0]
    terms = torch.where(p > 0, -p * torch.log(p), 0.0)
    return torch.zeros(labels.shape[1], dtype=torch.float64).index_add_(0, column, terms).clamp_min(0.0)


def covariance(codes: torch.Tensor) -> torch.Tensor:
    """Sample covariance ``[D, D]`` float64 of ``codes [N, D]`` (N − 1 in the denominator, as ``np.cov``)."""
    codes = _check_matrix(codes, "codes", integer=False).double()
    if codes.shape[0] < 2:
        raise ValueError(f"codes needs at least 2 rows for a covariance, got {codes.shape[0]}")
    centred = codes - codes.mean(0)
    return centred.T @ centred / (codes.shape[0] - 1)


def gaussian_total_correlation(codes: torch.Tensor) -> float:
    """Total correlation (nats) of the Gaussian with the sample covariance Σ of ``codes [N, D]``.

    ``TC = ½ (Σ_d log Σ_dd − log det Σ) = −½ log det R`` with R the correlation matrix: the KL
    divergence from N(0, Σ) to the product of its marginals (disentanglement_lib's
    ``gaussian_total_correlation`` of ``np.cov(mus)``). Computed through the Cholesky factor of R,
    in float64. A ValueError names the constant latents (zero variance), or says that the latents
    are linearly dependent, when Σ is singular.
    """
    cov = covariance(codes)
    variances = cov.diagonal()
    constant = (variances <= 0).nonzero().flatten().tolist()
    if constant:
        raise ValueError(f"codes: latent(s) {constant} are constant, the covariance is singular (TC undefined)")
    scale = variances.rsqrt()
    correlation = cov * scale[:, None] * scale[None, :]
    # L_kk² is 1 − R² of latent k regressed on the latents before it: ~0 (up to rounding) exactly
    # when the latents are linearly dependent, where a plain Cholesky may still succeed.
    factor, info = torch.linalg.cholesky_ex(correlation)
    if int(info) != 0 or float(factor.diagonal().min()) ** 2 < _DEPENDENCE_TOLERANCE:
        raise ValueError("codes: the latents are linearly dependent, the covariance is singular (TC undefined)")
    return float(-torch.log(factor.diagonal()).sum())


class ActiveUnits(NamedTuple):
    """``count`` latents whose ``variances`` (Cov_x of the posterior mean, one per latent) exceed the threshold."""

    count: int
    variances: list[float]


def active_units(mu: torch.Tensor, threshold: float = 1e-2) -> ActiveUnits:
    """Active units of posterior means ``mu [N, D]`` (Burda et al. 2016): latent d is active when
    ``Cov_x(E_q[z_d | x]) > threshold`` (0.01 in the paper; sample variance with N − 1)."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
        raise ValueError(f"threshold must be a number ≥ 0, got {threshold!r}")
    variances = covariance(mu).diagonal()
    return ActiveUnits(int((variances > threshold).sum()), variances.tolist())
