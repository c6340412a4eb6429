"""Permutation tests: exact p-values, level controlled at α under the null, power rising with the effect."""

from __future__ import annotations

import pytest
import torch

from aelearn.ops import hsic, mmd
from aelearn.stats import hsic_test, mmd_test

ALPHA = 0.05


def test_p_value_is_the_permutation_rank():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g), torch.randn(25, 2, generator=g) + 0.4
    result = mmd_test(x, y, num_permutations=49, generator=torch.Generator().manual_seed(1))
    assert result.statistic == pytest.approx(float(mmd(x, y)), rel=1e-6)
    assert result.null.shape == (49,)
    assert result.p_value == (1 + int((result.null >= result.statistic).sum())) / 50
    again = mmd_test(x, y, num_permutations=49, generator=torch.Generator().manual_seed(1))
    assert again.p_value == result.p_value and torch.equal(again.null, result.null)


def _rejection_rate(test, draw, repetitions: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    rejections = sum(test(*draw(g), num_permutations=49, generator=g).reject(ALPHA) for _ in range(repetitions))
    return rejections / repetitions


def test_mmd_test_level_and_power():
    def same(g):
        return torch.randn(30, 2, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g, dtype=torch.float64)

    # 200 tests under the null, 49 permutations each: an exact test rejects at p ≤ 0.05, i.e. with
    # probability 2/50 = 0.04; the count is Binomial(200, 0.04), mean 8, sd 2.8. 20 or more
    # (rate ≥ 0.1) would mean the level is not controlled; none at all, a degenerate test.
    level = _rejection_rate(mmd_test, same, 200, seed=1)
    assert 0.01 <= level < 0.1
    powers = []
    for shift in (0.3, 0.6, 1.2):
        def shifted(g, shift=shift):
            x, y = same(g)
            return x, y + shift
        powers.append(_rejection_rate(mmd_test, shifted, 40, seed=2))
    assert powers == sorted(powers) and powers[-1] >= 0.95 and powers[0] < powers[-1]


def test_hsic_test_level_and_power():
    def pairs(g, strength):
        x = torch.randn(50, 2, generator=g, dtype=torch.float64)
        # Dependence without correlation at strength > 0: y depends on |x_0|.
        y = strength * x[:, :1].abs() + torch.randn(50, 1, generator=g, dtype=torch.float64)
        return x, y

    level = _rejection_rate(hsic_test, lambda g: pairs(g, 0.0), 200, seed=3)
    assert 0.01 <= level < 0.1
    powers = [_rejection_rate(hsic_test, lambda g, s=s: pairs(g, s), 40, seed=4) for s in (0.5, 1.5, 4.0)]
    assert powers == sorted(powers) and powers[-1] >= 0.95 and powers[0] < powers[-1]


def test_hsic_test_with_labels_and_the_unbiased_estimator():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(60, 3, generator=g)
    dependent = (x[:, 0] > 0).long()
    independent = torch.randint(0, 2, (60,), generator=g)
    for estimator in ("biased", "unbiased"):
        hit = hsic_test(x, dependent, kernel_y="delta", estimator=estimator, num_permutations=199, generator=g)
        assert hit.reject(ALPHA)
        assert hit.statistic == pytest.approx(float(hsic(x, dependent, kernel_y="delta", estimator=estimator)), rel=1e-6)
        assert not hsic_test(x, independent, kernel_y="delta", estimator=estimator, num_permutations=199, generator=g).reject(0.01)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"num_permutations": 0}, ValueError, "num_permutations must be a positive integer"),
    ({"num_permutations": 9.5}, ValueError, "num_permutations must be a positive integer"),
    ({"generator": 42}, TypeError, "generator must be a CPU torch.Generator"),
])
def test_bad_input(kwargs, error, words):
    x, y = torch.randn(10, 2), torch.randn(10, 2)
    for test in (mmd_test, hsic_test):
        with pytest.raises(error, match=words):
            test(x, y, **kwargs)
