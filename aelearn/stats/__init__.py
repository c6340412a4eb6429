"""Kernel hypothesis tests built on the fused ops: two-sample (MMD) and independence (HSIC)."""

from aelearn.stats.permutation import PermutationTestResult, hsic_test, mmd_test

__all__ = ["PermutationTestResult", "hsic_test", "mmd_test"]
