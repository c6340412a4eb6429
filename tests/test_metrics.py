"""Disentanglement metrics: batched information measures against the per-pair references, closed
forms, known answers of every metric on representations built from the factors, bad input.

The known-answer dataset's images *are* its factors (``observation_shape (F, 1, 1)``), so a
representation is a known function of the factors: the identity (perfectly disentangled), a random
rotation (entangled), pure noise (no information), a duplicated factor (two latents carry one
factor). Protocols are shrunk to a few hundred points to keep the file under ~20 s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aelearn.data import FactorDataset
from aelearn.metrics._reference import (
    reference_discretize,
    reference_entropy,
    reference_mig,
    reference_modularity,
    reference_mutual_information,
)
from aelearn.metrics.disentanglement import (
    METRICS,
    beta_vae_score,
    compute_metrics,
    dci,
    dci_scores,
    factor_vae_score,
    mig,
    modularity_explicitness,
    modularity_score,
    mutual_information_gap,
    sap,
    unsupervised,
)
from aelearn.metrics.information import (
    active_units,
    discretize,
    entropy,
    gaussian_total_correlation,
    mutual_information,
)

pytest.importorskip("sklearn")
# Small protocols: one thread is as fast, and far faster when other processes share the cores.
pytestmark = pytest.mark.usefixtures("one_thread")


class FactorImages(FactorDataset):
    """Three factors of 4, 5 and 6 values; the image of a factor vector is the vector itself."""

    factor_names = ("a", "b", "c")
    factor_sizes = (4, 5, 6)
    observation_shape = (3, 1, 1)

    def images_from_factors(self, factors):
        return factors.float()[:, :, None, None]


class ConstantFactor(FactorImages):
    """Factor b takes one value only."""

    factor_sizes = (4, 1, 6)


DATASET = FactorImages()
ROTATION = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))[0]


def identity(x):
    return x.flatten(1)


def rotation(x):
    return (x.flatten(1) - 2.5) @ ROTATION


def noise(x):
    return torch.randn(len(x), 3)


def duplicated(x):
    return x.flatten(1)[:, [0, 0, 1, 2]]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Information building blocks


def test_discretize_reproduces_histogram_binning():
    g = seeded()
    codes = torch.randn(3000, 6, generator=g, dtype=torch.float64)
    codes[:, 1] = 0.25  # constant: numpy widens the range to ±0.5
    codes[:, 2] = torch.randint(7, (3000,), generator=g).double()  # values on bin edges
    codes[:, 3] = codes[:, 3] * 1e-9 + 1e6
    codes[:, 4] = torch.from_numpy(np.linspace(-1.3, 2.9, 21)).repeat(150)[:3000]  # exactly on numpy's edges
    labels = discretize(codes, 20)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(labels.numpy(), reference_discretize(codes.numpy(), 20))
    assert int(labels.min()) >= 1 and int(labels.max()) == 20
    codes32 = torch.randn(2000, 4, generator=g)
    np.testing.assert_array_equal(discretize(codes32, 7).numpy(), reference_discretize(codes32.double().numpy(), 7))


def test_mutual_information_matches_per_pair_reference():
    g = seeded(1)
    n = 2500
    a = torch.stack([torch.randint(k, (n,), generator=g) for k in (2, 20, 5, 1)], 1)
    a[:, 2] = a[:, 2] * 1000 - 7  # sparse, negative label values
    b = torch.stack([torch.randint(k, (n,), generator=g) for k in (3, 40, 32)], 1).int()
    b[:, 0] = (a[:, 1] + b[:, 0]) % 6  # dependent on a latent
    mi = mutual_information(a, b)
    assert mi.shape == (4, 3) and mi.dtype == torch.float64
    np.testing.assert_allclose(mi.numpy(), reference_mutual_information(a.numpy(), b.numpy()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(entropy(b).numpy(), reference_entropy(b.numpy()), rtol=0, atol=1e-12)
    assert float(mi[3].abs().max()) == 0.0  # a constant column shares no information
    np.testing.assert_allclose(mutual_information(b, a).numpy(), mi.T.numpy(), rtol=0, atol=1e-13)


def test_mutual_information_with_many_sparse_labels():
    # Label values far apart (numbered by a sort) and thousands of them per column (cells counted
    # by a sort rather than a dense table of K_d · K_f cells per pair).
    g = seeded(11)
    n = 2000
    a = torch.randint(-(2**40), 2**40, (n, 3), generator=g)
    a[:, 0] = a[:, 0] % 50
    b = torch.stack([torch.randperm(n, generator=g) * 1_000_003, torch.randint(3, (n,), generator=g)], 1)
    b[:, 1] += a[:, 0] % 3
    mi = mutual_information(a, b)
    np.testing.assert_allclose(mi.numpy(), reference_mutual_information(a.numpy(), b.numpy()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(entropy(a).numpy(), reference_entropy(a.numpy()), rtol=0, atol=1e-12)


def test_mutual_information_of_identical_variables_is_entropy():
    g = seeded(2)
    labels = torch.randint(9, (4000, 3), generator=g)
    mi = mutual_information(labels, labels)
    np.testing.assert_allclose(mi.diagonal().numpy(), entropy(labels).numpy(), rtol=1e-13)
    uniform = torch.arange(8).repeat(50)[:, None]
    assert entropy(uniform).item() == pytest.approx(math.log(8), rel=1e-14)


def test_mig_and_modularity_match_references():
    g = seeded(4)
    factors = torch.stack([torch.randint(k, (3000,), generator=g) for k in (3, 6, 10)], 1)
    codes = torch.randn(3000, 5, generator=g, dtype=torch.float64)
    codes[:, :3] += factors.double() * torch.tensor([1.0, 0.5, 0.2])
    assert mutual_information_gap(codes, factors) == pytest.approx(reference_mig(codes.numpy(), factors.numpy()), abs=1e-12)
    mi = mutual_information(discretize(codes, 20), factors)
    assert modularity_score(mi) == pytest.approx(reference_modularity(codes.numpy(), factors.numpy()), abs=1e-12)


def test_gaussian_total_correlation_closed_forms():
    g = seeded(5)
    n = 100_000
    independent = torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1, 7.0], dtype=torch.float64)
    assert abs(gaussian_total_correlation(independent)) < 1e-3
    rho = 0.8
    x = torch.randn(n, generator=g, dtype=torch.float64)
    correlated = torch.stack([x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)], 1)
    assert gaussian_total_correlation(correlated) == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.01)
    # The sample formula itself, as disentanglement_lib writes it, to rounding.
    codes = torch.randn(500, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov = np.cov(codes.numpy().T)
    expected = 0.5 * (np.log(np.diag(cov)).sum() - np.linalg.slogdet(cov)[1])
    assert gaussian_total_correlation(codes) == pytest.approx(expected, rel=1e-12)
    assert gaussian_total_correlation(codes.float()) == pytest.approx(expected, rel=1e-5)


def test_gaussian_total_correlation_singular_covariance():
    codes = torch.randn(100, 4, generator=seeded(6), dtype=torch.float64)
    codes[:, 1] = 2.0
    codes[:, 3] = -1.0
    with pytest.raises(ValueError, match=r"latent\(s\) \[1, 3\] are constant"):
        gaussian_total_correlation(codes)
    codes[:, 1] = codes[:, 0] * 2 + codes[:, 2]
    codes[:, 3] = torch.randn(100, generator=seeded(7), dtype=torch.float64)
    with pytest.raises(ValueError, match="linearly dependent"):
        gaussian_total_correlation(codes)


def test_active_units_on_constructed_codes():
    n = 1000
    base = torch.randn(n, generator=seeded(8), dtype=torch.float64)
    base = (base - base.mean()) / base.std()  # sample variance exactly 1
    mu = torch.stack([base * 0.0 + 3.0, base * math.sqrt(0.005), base * math.sqrt(0.02), base], 1)
    result = active_units(mu)
    assert result.count == 2
    np.testing.assert_allclose(result.variances, [0.0, 0.005, 0.02, 1.0], rtol=1e-12, atol=1e-15)
    assert active_units(mu, threshold=0.001).count == 3


# ----------------------------------------------------------------------------------------------
# Known answers of every metric

SMALL = {
    "beta_vae": dict(batch_size=16, num_train=300, num_eval=200),
    "factor_vae": dict(batch_size=16, num_train=300, num_eval=300, num_variance_estimate=1000),
    "mig": dict(num_train=2000),
    "dci": dict(num_train=400, num_test=300),
    "sap": dict(num_train=500, num_test=300),
    "modularity": dict(num_train=1000, num_test=500),
    "unsupervised": dict(num_train=1000),
}


def small(name, representation, **extra):
    return METRICS[name](representation, DATASET, generator=seeded(), **{**SMALL[name], **extra})


def test_identity_representation_is_disentangled():
    assert small("mig", identity)["mig"] > 0.98
    scores = small("dci", identity)
    assert scores["disentanglement"] > 0.98 and scores["completeness"] > 0.98 and scores["informativeness_test"] > 0.98
    assert small("beta_vae", identity)["eval_accuracy"] > 0.98
    factor = small("factor_vae", identity)
    assert factor["eval_accuracy"] == 1.0 and factor["num_active_dims"] == 3.0
    modularity = small("modularity", identity)
    assert modularity["modularity"] > 0.98 and modularity["explicitness_test"] > 0.98
    assert small("sap", identity, continuous_factors=True)["sap"] > 0.95
    # Discrete SAP: a one-feature linear SVM cannot separate every class of an ordinal factor.
    assert small("sap", identity)["sap"] > 0.3
    scores = small("unsupervised", identity)
    assert abs(scores["gaussian_total_correlation"]) < 0.01 and scores["active_units"] == 3.0


def test_rotated_representation_is_entangled():
    assert small("mig", rotation)["mig"] < 0.3
    scores = small("dci", rotation)
    assert scores["disentanglement"] < 0.6 and scores["informativeness_test"] > 0.9
    assert small("modularity", rotation)["modularity"] < 0.8
    assert small("unsupervised", rotation)["mutual_info_score"] > 0.3


def test_noise_representation_scores_near_zero_or_chance():
    assert small("mig", noise)["mig"] < 0.02
    scores = small("dci", noise)
    assert scores["disentanglement"] < 0.05 and scores["completeness"] < 0.05 and scores["informativeness_test"] < 0.4
    assert small("sap", noise)["sap"] < 0.05
    assert small("beta_vae", noise)["eval_accuracy"] < 0.5  # chance 1/3
    assert small("factor_vae", noise)["eval_accuracy"] < 0.5
    assert small("modularity", noise)["explicitness_test"] < 0.6  # chance 0.5


def test_duplicated_factor_has_no_gap():
    # Two latents carry factor a: its gap is 0, the other two factors' gaps stay near 1.
    score = small("mig", duplicated)["mig"]
    assert 0.6 < score < 0.7
    factors = DATASET.sample_factors(2000, seeded())
    codes = duplicated(DATASET.images_from_factors(factors)).double()
    mi = mutual_information(discretize(codes), factors)
    assert float(mi[0, 0]) == float(mi[1, 0]) == pytest.approx(float(entropy(factors)[0]), rel=1e-12)
    assert small("dci", duplicated)["completeness"] < 0.9


def test_mig_leaves_out_constant_factors():
    # disentanglement_lib would divide 0 by 0 for factor b; the mean runs over a and c.
    assert mig(identity, ConstantFactor(), num_train=1000, generator=seeded())["mig"] > 0.98


def test_dci_scores_closed_forms():
    assert dci_scores(torch.eye(4)) == pytest.approx((1.0, 1.0), abs=1e-8)
    assert dci_scores(torch.ones(3, 3)) == pytest.approx((0.0, 0.0), abs=1e-8)
    disentanglement, completeness = dci_scores(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert disentanglement == pytest.approx(1.0, abs=1e-8) and completeness == pytest.approx(0.0, abs=1e-8)
    assert dci_scores(torch.zeros(2, 2)) == pytest.approx((0.0, 0.0), abs=1e-8)


@pytest.mark.parametrize("classifier", ["random_forest", "lasso"])
def test_dci_other_classifiers(classifier):
    scores = small("dci", identity, classifier=classifier)
    assert scores["informativeness_test"] > 0.95 and scores["disentanglement"] > 0.7
    # (An L1 fit on noise keeps few latents, so only its informativeness is near chance.)
    assert small("dci", noise, classifier=classifier)["informativeness_test"] < 0.4


def test_same_seed_same_score_and_batching_does_not_matter():
    first = beta_vae_score(rotation, DATASET, batch_size=8, num_train=100, num_eval=50, generator=seeded(9))
    assert first == beta_vae_score(rotation, DATASET, batch_size=8, num_train=100, num_eval=50, generator=seeded(9))
    a = mig(rotation, DATASET, num_train=700, batch_size=64, generator=seeded(10))
    assert a == mig(rotation, DATASET, num_train=700, batch_size=1000, generator=seeded(10))


def test_factor_vae_prunes_collapsed_latents():
    def with_collapsed(x):
        codes = x.flatten(1)
        return torch.cat([codes, torch.full((len(x), 2), 0.5) + 0.01 * torch.randn(len(x), 2)], 1)

    scores = factor_vae_score(with_collapsed, DATASET, batch_size=16, num_train=200, num_eval=200,
                              num_variance_estimate=500, generator=seeded())
    assert scores["num_active_dims"] == 3.0 and scores["eval_accuracy"] == 1.0
    scores = factor_vae_score(lambda x: torch.zeros(len(x), 2), DATASET, num_variance_estimate=100, generator=seeded())
    assert scores == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}


# ----------------------------------------------------------------------------------------------
# compute_metrics


def test_compute_metrics_selects_and_overrides():
    results = compute_metrics(identity, DATASET, ["mig", "unsupervised", "beta_vae"], generator=seeded(),
                              num_train=500, beta_vae={"batch_size": 8, "num_eval": 100})
    assert list(results) == ["mig", "unsupervised", "beta_vae"]
    assert all(isinstance(v, float) for scores in results.values() for v in scores.values())
    assert results["mig"]["mig"] > 0.95
    # A metric's score does not depend on the other metrics run with it.
    alone = compute_metrics(identity, DATASET, ["unsupervised"], generator=seeded(), num_train=500)
    assert alone["unsupervised"] == results["unsupervised"]
    images = DATASET.images_from_factors(DATASET.sample_factors(300, seeded()))
    assert list(compute_metrics(identity, images, generator=seeded(), num_train=200)) == ["unsupervised"]
    pairs = torch.utils.data.TensorDataset(images, torch.zeros(len(images)))
    scores = unsupervised(identity, pairs, num_train=200, generator=seeded())
    assert scores["active_units"] == 3.0 and abs(scores["gaussian_total_correlation"]) < 0.1


def test_compute_metrics_bad_options():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(identity, DATASET, ["mig", "irs"])
    with pytest.raises(TypeError, match="num_eval"):
        compute_metrics(identity, DATASET, ["mig"], num_eval=10)
    with pytest.raises(TypeError, match="mig does not accept"):
        compute_metrics(identity, DATASET, ["mig"], mig={"num_eval": 10})


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("metric", ["beta_vae", "factor_vae", "mig", "dci", "sap", "modularity"])
def test_supervised_metric_needs_factors(metric):
    images = torch.rand(50, 3, 1, 1)
    with pytest.raises(TypeError, match="ground-truth factors"):
        METRICS[metric](identity, images)


def test_representation_nan_or_wrong_shape():
    def with_nan(x):
        codes = x.flatten(1).clone()
        codes[0, 1] = float("nan")
        return codes

    with pytest.raises(ValueError, match=r"NaN or Inf in latent\(s\) \[1\]"):
        mig(with_nan, DATASET, num_train=100)
    with pytest.raises(ValueError, match="must return \\[n, D\\]"):
        mig(lambda x: x.flatten(1)[:-1], DATASET, num_train=100)
    with pytest.raises(ValueError, match="must return \\[n, D\\]"):
        unsupervised(lambda x: x.flatten(), DATASET, num_train=100)
    with pytest.raises(ValueError, match="D ≥ 2"):
        mig(lambda x: x.flatten(1)[:, :1], DATASET, num_train=100)


def test_too_few_points_and_bad_counts():
    with pytest.raises(ValueError, match="num_train must be ≥ 3"):
        beta_vae_score(identity, DATASET, num_train=2)
    with pytest.raises(ValueError, match="num_test must be ≥ 1"):
        dci(identity, DATASET, num_train=100, num_test=0)
    with pytest.raises(ValueError, match=r"factor 1 \(b\) takes a single value"):
        sap(identity, ConstantFactor(), num_train=100, num_test=10, generator=seeded())
    with pytest.raises(TypeError, match="num_train must be an int"):
        mig(identity, DATASET, num_train=10.0)
    with pytest.raises(ValueError, match="num_bins"):
        mig(identity, DATASET, num_train=100, num_bins=0)
    with pytest.raises(ValueError, match="classifier must be one of"):
        dci(identity, DATASET, classifier="svm")
    with pytest.raises(TypeError, match="generator"):
        modularity_explicitness(identity, DATASET, generator=0)
    with pytest.raises(TypeError, match="integer dtype"):
        mutual_information(torch.rand(10, 2), torch.zeros(10, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="same number of rows"):
        mutual_information(torch.zeros(10, 2, dtype=torch.int64), torch.zeros(9, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        discretize(torch.tensor([[0.0], [float("inf")]]))
