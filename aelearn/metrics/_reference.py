"""Straightforward per-column and per-pair references of the batched metric code (the spec, for tests and benchmarks).

These follow disentanglement_lib's ``utils`` (``_histogram_discretize``, ``discrete_mutual_info``,
``discrete_entropy``) and its MIG and modularity formulas literally: a numpy histogram per latent,
one ``sklearn.metrics.mutual_info_score`` call per (latent, factor) pair. Inputs and outputs are
numpy arrays with rows the data points (``[N, D]``), unlike the library's ``[D, N]``.
"""

from __future__ import annotations

import numpy as np


def reference_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """``np.digitize`` of each column on the left edges of its ``np.histogram`` bins: int64 ``[N, D]``."""
    codes = np.asarray(codes, dtype=np.float64)
    labels = np.zeros(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram(codes[:, d], num_bins)[1]
        labels[:, d] = np.digitize(codes[:, d], edges[:-1])
    return labels


def reference_mutual_information(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``mutual_info_score(a[:, d], b[:, f])`` for every pair: float64 ``[D, F]`` nats."""
    from sklearn.metrics import mutual_info_score

    a, b = np.asarray(a), np.asarray(b)
    mi = np.zeros((a.shape[1], b.shape[1]))
    for d in range(a.shape[1]):
        for f in range(b.shape[1]):
            mi[d, f] = mutual_info_score(b[:, f], a[:, d])
    return mi


def reference_entropy(labels: np.ndarray) -> np.ndarray:
    """``mutual_info_score(b_f, b_f)`` for every column: float64 ``[F]`` nats."""
    labels = np.asarray(labels)
    return np.array([reference_mutual_information(labels[:, [f]], labels[:, [f]])[0, 0] for f in range(labels.shape[1])])


def reference_mig(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
    """disentanglement_lib's discrete MIG: mean over factors of (top − second MI) / H(factor)."""
    mi = reference_mutual_information(reference_discretize(codes, num_bins), factors)
    ordered = np.sort(mi, axis=0)[::-1]
    return float(np.mean((ordered[0] - ordered[1]) / reference_entropy(factors)))


def reference_modularity(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
    """disentanglement_lib's modularity (Ridgeway & Mozer 2018) of the discretised codes, loop per latent."""
    mi = reference_mutual_information(reference_discretize(codes, num_bins), factors)
    scores = []
    for row in mi:
        squared = row**2
        largest = squared.max()
        if largest == 0:
            scores.append(0.0)
            continue
        deviation = (squared.sum() - largest) / (largest * (len(row) - 1))
        scores.append(1.0 - deviation)
    return float(np.mean(scores))
