"""Permutation tests with kernel statistics: every statistic is one fused, memory-linear op call.

Under the null hypothesis (x and y from one distribution for :func:`mmd_test`; x independent of y
for :func:`hsic_test`) the joint law of the data is invariant to the permutations used, so with B
permuted statistics T_1..T_B and the observed T_0 the p-value

    p = (1 + #{b : T_b ≥ T_0}) / (1 + B)

satisfies P(p ≤ α) ≤ α for every α and every n: the test is exact, not asymptotic (e.g. Lehmann &
Romano, Testing Statistical Hypotheses, §15.2). Kernel scales chosen by the median heuristic are
computed once from the pooled (for MMD) or marginal (for HSIC) sample, which permutations leave
unchanged, and then held fixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aelearn.ops._kernels import as_positive_floats, median_sq_distance
from aelearn.ops.hsic import LABEL_KERNEL, hsic
from aelearn.ops.mmd import mmd


@dataclass(frozen=True)
class PermutationTestResult:
    """``statistic``: the observed value; ``p_value``: (1 + #{null ≥ statistic}) / (1 + B);
    ``null``: the B statistics of the permuted data (float64, ``[B]``)."""

    statistic: float
    p_value: float
    null: torch.Tensor

    def reject(self, alpha: float = 0.05) -> bool:
        """Whether the null hypothesis is rejected at level ``alpha``."""
        return self.p_value <= alpha


def _check_permutations(num_permutations: int) -> int:
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 1:
        raise ValueError(f"num_permutations must be a positive integer, got {num_permutations!r}")
    return num_permutations


def _check_generator(generator: torch.Generator | None) -> None:
    # Permutations are drawn on the CPU (cheap), so the generator must be a CPU one.
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (permutations are drawn on the CPU), got one on {generator.device}")


def _fixed_scales(kernel: str, bandwidths, sample_of, name: str):
    """The kernel's scales, from the median heuristic of the (permutation-invariant) sample if None."""
    if kernel not in ("rbf", "imq") or bandwidths is not None:
        return bandwidths
    median = median_sq_distance(sample_of())
    if not median > 0:
        raise ValueError(f"{name}=None uses the median heuristic, but the median pairwise distance is 0; pass {name} explicitly")
    return math.sqrt(median) if kernel == "rbf" else median


def _permutation_test(statistic: float, permuted_statistic, size: int, num_permutations: int, generator) -> PermutationTestResult:
    """The null distribution from ``permuted_statistic(order)`` over random orders of ``size`` items."""
    null = torch.empty(num_permutations, dtype=torch.float64)
    for b in range(num_permutations):
        null[b] = permuted_statistic(torch.randperm(size, generator=generator))
    p_value = (1 + int((null >= statistic).sum())) / (1 + num_permutations)
    return PermutationTestResult(statistic, p_value, null)


def mmd_test(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: str = "rbf",
    bandwidths: float | Sequence[float] | None = None,
    estimator: str = "unbiased",
    num_permutations: int = 500,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> PermutationTestResult:
    """Two-sample test of P = Q from ``x: [n, d] ~ P`` and ``y: [m, d] ~ Q`` with the MMD² statistic.

    Each permutation reassigns the pooled n + m points to samples of sizes n and m (drawn with
    ``generator``, a CPU generator). Arguments otherwise as :func:`aelearn.ops.mmd`.
    """
    _check_permutations(num_permutations)
    _check_generator(generator)
    if isinstance(bandwidths, (list, tuple, torch.Tensor)):
        bandwidths = as_positive_floats("bandwidths", bandwidths)
    with torch.no_grad():
        statistic = float(mmd(x, y, kernel=kernel, bandwidths=bandwidths, estimator=estimator, backend=backend))
        pooled = torch.cat([x, y])
        bandwidths = _fixed_scales(kernel, bandwidths, lambda: pooled, "bandwidths")
        n = len(x)

        def permuted(order):
            shuffled = pooled[order.to(pooled.device)]
            return float(mmd(shuffled[:n], shuffled[n:], kernel=kernel, bandwidths=bandwidths, estimator=estimator, backend=backend))

        return _permutation_test(statistic, permuted, len(pooled), num_permutations, generator)


def hsic_test(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel_x: str = "rbf",
    kernel_y: str = "rbf",
    bandwidth_x: float | Sequence[float] | None = None,
    bandwidth_y: float | Sequence[float] | None = None,
    estimator: str = "biased",
    num_permutations: int = 500,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> PermutationTestResult:
    """Independence test of x and y from the pairs ``x: [n, p]``, ``y: [n, q]`` with the HSIC statistic.

    Each permutation shuffles the rows of y against those of x (drawn with ``generator``, a CPU
    generator), breaking any dependence. Arguments otherwise as :func:`aelearn.ops.hsic`.
    """
    _check_permutations(num_permutations)
    _check_generator(generator)
    kwargs = dict(kernel_x=kernel_x, kernel_y=kernel_y, estimator=estimator, backend=backend)
    with torch.no_grad():
        statistic = float(hsic(x, y, bandwidth_x=bandwidth_x, bandwidth_y=bandwidth_y, **kwargs))
        bandwidth_x = _fixed_scales(kernel_x, bandwidth_x, lambda: x, "bandwidth_x")
        if kernel_y != LABEL_KERNEL:
            bandwidth_y = _fixed_scales(kernel_y, bandwidth_y, lambda: y, "bandwidth_y")

        def permuted(order):
            return float(hsic(x, y[order.to(y.device)], bandwidth_x=bandwidth_x, bandwidth_y=bandwidth_y, **kwargs))

        return _permutation_test(statistic, permuted, len(y), num_permutations, generator)
