"""Disentanglement metrics of a representation on a dataset with ground-truth factors.

Each metric takes a *representation function*, any callable ``representation(x [N, C, H, W]) ->
[N, D]`` (e.g. ``model.encode``; images come as CPU float32 tensors, a representation on another
device moves them itself), and a :class:`aelearn.data.FactorDataset`-like dataset (``factor_sizes``,
``sample_factors(n, generator)``, ``images_from_factors(factors)``). It returns a dict of plain
Python floats. Defaults are disentanglement_lib's published protocols: the gin configs of
``config/unsupervised_study_v1/metric_configs`` used by Locatello et al. (2019), "Challenging Common
Assumptions in the Unsupervised Learning of Disentangled Representations".

Sampling. i.i.d. metrics draw all factor vectors with one ``dataset.sample_factors(num, generator)``
call and render and represent them ``batch_size`` images at a time (``dataset.sample`` is exactly
``images_from_factors(sample_factors(n))``; doing it in chunks bounds memory and makes the score
independent of ``batch_size``). BetaVAE and FactorVAE draw their fixed-factor groups from
``sample_factors`` and render several groups per representation call. Every random choice comes from
``generator``; scikit-learn estimators get a ``random_state`` drawn from it: the same generator seed
gives the same scores.

Vectorisation. Mutual information (MIG, modularity, the unsupervised score) is one batched
computation over all (latent, factor) pairs (:mod:`aelearn.metrics.information`); the votes of
BetaVAE/FactorVAE are computed for many groups per call; SAP's continuous path is one matrix
product. Where the protocol *is* one classifier per pair or per factor (SAP's discrete path, DCI,
explicitness), that stays, as the protocol.

:func:`compute_metrics` runs several metrics by name (:data:`METRICS`).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import numpy as np
import torch

from aelearn.metrics.information import (
    active_units,
    discretize,
    entropy,
    gaussian_total_correlation,
    mutual_information,
)

Representation = Callable[[torch.Tensor], torch.Tensor]

# Images per representation call in the BetaVAE/FactorVAE protocols (whole groups at a time).
_IMAGES_PER_CALL = 1024
DEFAULT_BATCH_SIZE = 256


# ----------------------------------------------------------------------------------------------
# Input checks and sampling


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _has_factors(dataset) -> bool:
    return all(hasattr(dataset, name) for name in ("factor_sizes", "sample_factors", "images_from_factors"))


def _check_factor_dataset(dataset, metric: str) -> int:
    """The number of factors of ``dataset``, or a TypeError: supervised metrics need ground-truth factors."""
    if not _has_factors(dataset):
        raise TypeError(
            f"dataset must have ground-truth factors for {metric} (an aelearn.data.FactorDataset with factor_sizes, "
            f"sample_factors and images_from_factors), got {type(dataset).__name__}"
        )
    if len(dataset.factor_sizes) == 0:
        raise ValueError(f"dataset has no factors, {metric} needs at least one")
    return len(dataset.factor_sizes)


def _factor_name(dataset, j: int) -> str:
    names = getattr(dataset, "factor_names", None)
    return f"{j} ({names[j]})" if names is not None and j < len(names) else str(j)


def _represent(representation: Representation, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``representation`` of ``images`` in batches, under no_grad, checked: float64 CPU ``[n, D]``."""
    if not callable(representation):
        raise TypeError(f"representation must be callable, got {type(representation).__name__}")
    parts = []
    with torch.no_grad():
        for batch in images.split(batch_size):
            codes = representation(batch)
            if not isinstance(codes, torch.Tensor):
                codes = torch.as_tensor(np.asarray(codes))
            if codes.dim() != 2 or codes.shape[0] != len(batch) or codes.shape[1] == 0:
                raise ValueError(
                    f"representation must return [n, D] codes with D ≥ 1 for n = {len(batch)} images, "
                    f"got shape {tuple(codes.shape)}"
                )
            if parts and codes.shape[1] != parts[0].shape[1]:
                raise ValueError(f"representation returned {parts[0].shape[1]} then {codes.shape[1]} latents")
            codes = codes.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(codes).all()):
                bad = (~torch.isfinite(codes)).any(0).nonzero().flatten().tolist()
                raise ValueError(f"representation returned NaN or Inf in latent(s) {bad}")
            parts.append(codes)
    return torch.cat(parts)


def sample_codes(representation: Representation, dataset, num_points: int, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_points`` i.i.d. codes ``[n, D]`` float64 and their factors ``[n, F]`` int64.

    The factors come from one ``dataset.sample_factors(num_points, generator)``; images are rendered
    and represented ``batch_size`` at a time.
    """
    _check_count(num_points, "num_points")
    _check_count(batch_size, "batch_size")
    _check_generator(generator)
    factors = dataset.sample_factors(num_points, generator)
    codes = torch.cat([
        _represent(representation, dataset.images_from_factors(chunk), batch_size) for chunk in factors.split(batch_size)
    ])
    return codes, factors.long()


def _sklearn_seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(2**31 - 1, (1,), generator=generator))


def _sklearn():
    """sklearn's ConvergenceWarning, or an ImportError naming the extra that installs scikit-learn."""
    try:
        from sklearn.exceptions import ConvergenceWarning
    except ImportError as error:
        raise ImportError("this metric needs scikit-learn: pip install aelearn[data]") from error
    return ConvergenceWarning


def _fit_quietly(model, x: np.ndarray, y: np.ndarray, convergence_warning):
    """``model.fit(x, y)`` with sklearn's ConvergenceWarning silenced: the protocols fix the
    iteration budgets and accept the fit as it ends."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convergence_warning)
        return model.fit(x, y)


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Both code sets standardised with the training mean and standard deviation (N in the
    denominator, as np.std); a constant latent is divided by 1, not 0."""
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((train - mean) / std).numpy(), ((test - mean) / std).numpy()


def _check_classes(factors: torch.Tensor, dataset, num_train: int) -> None:
    for j in range(factors.shape[1]):
        if len(torch.unique(factors[:, j])) < 2:
            raise ValueError(
                f"factor {_factor_name(dataset, j)} takes a single value in the num_train = {num_train} training "
                f"points: a classifier needs at least two classes (increase num_train)"
            )


# ----------------------------------------------------------------------------------------------
# BetaVAE and FactorVAE: votes of groups of images that share one factor


def _group_codes(representation: Representation, dataset, factors: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., group, D]`` of factor vectors ``[..., group, F]``."""
    flat = factors.reshape(-1, factors.shape[-1])
    codes = _represent(representation, dataset.images_from_factors(flat), _IMAGES_PER_CALL)
    return codes.view(*factors.shape[:-1], codes.shape[1])


def _beta_vae_points(representation, dataset, group_size: int, num_points: int, generator):
    """BetaVAE training points: features ``[num_points, D]`` (mean |z1 − z2| over a group of pairs
    sharing one factor) and labels ``[num_points]`` (that factor)."""
    num_factors = len(dataset.factor_sizes)
    per_call = max(1, _IMAGES_PER_CALL // (2 * group_size))
    # Filled in place: thousands of small tensors kept between the large transient image batches
    # fragment the heap, and the process's memory then grows with num_points.
    features, labels = None, torch.empty(num_points, dtype=torch.int64)
    for start in range(0, num_points, per_call):
        count = min(per_call, num_points - start)
        fixed = torch.randint(num_factors, (count,), generator=generator)
        first = dataset.sample_factors(count * group_size, generator).view(count, group_size, num_factors)
        second = dataset.sample_factors(count * group_size, generator).view(count, group_size, num_factors)
        keep = torch.nn.functional.one_hot(fixed, num_factors).bool()[:, None, :]
        second = torch.where(keep, first, second)
        codes = _group_codes(representation, dataset, torch.stack([first, second]))
        if features is None:
            features = torch.empty(num_points, codes.shape[-1], dtype=torch.float64)
        torch.mean((codes[0] - codes[1]).abs(), 1, out=features[start : start + count])
        labels[start : start + count] = fixed
    return features.numpy(), labels.numpy()


def beta_vae_score(representation: Representation, dataset, *, batch_size: int = 64, num_train: int = 10000,
                   num_eval: int = 5000, generator: torch.Generator | None = None) -> dict[str, float]:
    """BetaVAE score (Higgins et al. 2017), disentanglement_lib's ``compute_beta_vae_sklearn``.

    One training point: pick a factor k uniformly, draw ``batch_size`` pairs of factor vectors that
    agree on factor k (the rest independent), feature = mean over the pairs of |z(x1) − z(x2)|,
    label = k. A ``sklearn.linear_model.LogisticRegression`` (library defaults: lbfgs, C = 1,
    max_iter = 100; its convergence warning silenced, the protocol accepts the fit as it ends) is
    fitted on ``num_train`` points and scored on ``num_eval`` fresh ones.

    Published settings (beta_vae_sklearn.gin): batch_size 64, num_train 10000, num_eval 5000.
    Returns ``{"train_accuracy", "eval_accuracy"}`` (chance: 1 / number of factors).
    """
    num_factors = _check_factor_dataset(dataset, "beta_vae_score")
    _check_count(batch_size, "batch_size")
    _check_count(num_train, "num_train", minimum=max(2, num_factors))
    _check_count(num_eval, "num_eval")
    _check_generator(generator)
    convergence_warning = _sklearn()
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = _beta_vae_points(representation, dataset, batch_size, num_train, generator)
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"num_train = {num_train} training points all fixed the same factor: increase num_train")
    model = _fit_quietly(LogisticRegression(random_state=_sklearn_seed(generator)), train_x, train_y, convergence_warning)
    eval_x, eval_y = _beta_vae_points(representation, dataset, batch_size, num_eval, generator)
    return {
        "train_accuracy": float(np.mean(model.predict(train_x) == train_y)),
        "eval_accuracy": float(np.mean(model.predict(eval_x) == eval_y)),
    }


def _factor_vae_votes(representation, dataset, group_size: int, num_points: int, generator,
                      global_variances: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Votes ``[F, D]`` int64: for each group (one factor fixed to a random value, the others
    uniform), the latent with the smallest variance relative to its global variance, among the
    active latents, votes for the fixed factor."""
    num_factors = len(dataset.factor_sizes)
    active_index = active.nonzero().flatten()
    votes = torch.zeros(num_factors, len(global_variances), dtype=torch.int64)
    per_call = max(1, _IMAGES_PER_CALL // group_size)
    for start in range(0, num_points, per_call):
        count = min(per_call, num_points - start)
        fixed = torch.randint(num_factors, (count,), generator=generator)
        factors = dataset.sample_factors(count * group_size, generator).view(count, group_size, num_factors)
        keep = torch.nn.functional.one_hot(fixed, num_factors).bool()[:, None, :]
        factors = torch.where(keep, factors[:, :1, :], factors)
        local_variances = _group_codes(representation, dataset, factors).var(1)  # N − 1, as np.var(ddof=1)
        ratio = local_variances[:, active_index] / global_variances[active_index]
        votes.index_put_((fixed, active_index[ratio.argmin(1)]), torch.ones(count, dtype=torch.int64), accumulate=True)
    return votes


def factor_vae_score(representation: Representation, dataset, *, batch_size: int = 64, num_train: int = 10000,
                     num_eval: int = 5000, num_variance_estimate: int = 10000, prune_threshold: float = 0.05,
                     generator: torch.Generator | None = None) -> dict[str, float]:
    """FactorVAE score (Kim & Mnih 2018), disentanglement_lib's ``compute_factor_vae``.

    Global variances of each latent from ``num_variance_estimate`` i.i.d. codes (N − 1); latents
    whose global *standard deviation* is below ``prune_threshold`` are pruned (collapsed to the
    prior). One vote: fix a random factor k at one random value across ``batch_size`` factor
    vectors, the latent with the smallest local/global variance ratio among the active ones votes
    for k. The classifier is the majority vote of each latent over ``num_train`` votes; accuracy is
    the share of ``num_eval`` fresh votes it gets right.

    Published settings (factor_vae_metric.gin): batch_size 64, num_train 10000, num_eval 5000,
    num_variance_estimate 10000, ``prune_dims.threshold = 0.05``. Quirks of the library: the
    threshold applies to the standard deviation (the function's own default is 0, the 0.05 comes
    from the gin config), and its ``num_active_dims`` is ``len(active_dims)`` of a boolean mask,
    i.e. always the number of latents; here it is the number of active latents. With no active
    latent every score is 0, as in the library.

    Returns ``{"train_accuracy", "eval_accuracy", "num_active_dims"}``.
    """
    _check_factor_dataset(dataset, "factor_vae_score")
    _check_count(batch_size, "batch_size", minimum=2)
    _check_count(num_train, "num_train")
    _check_count(num_eval, "num_eval")
    _check_count(num_variance_estimate, "num_variance_estimate", minimum=2)
    if isinstance(prune_threshold, bool) or not isinstance(prune_threshold, (int, float)) or not prune_threshold >= 0:
        raise ValueError(f"prune_threshold must be a number ≥ 0, got {prune_threshold!r}")
    _check_generator(generator)
    codes, _ = sample_codes(representation, dataset, num_variance_estimate, generator=generator)
    global_variances = codes.var(0)
    active = global_variances.sqrt() >= prune_threshold
    if not bool(active.any()):
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}
    train_votes = _factor_vae_votes(representation, dataset, batch_size, num_train, generator, global_variances, active)
    classifier = train_votes.argmax(0)  # the first factor on ties, as np.argmax
    latents = torch.arange(train_votes.shape[1])
    eval_votes = _factor_vae_votes(representation, dataset, batch_size, num_eval, generator, global_variances, active)
    return {
        "train_accuracy": float(train_votes[classifier, latents].sum() / train_votes.sum()),
        "eval_accuracy": float(eval_votes[classifier, latents].sum() / eval_votes.sum()),
        "num_active_dims": float(active.sum()),
    }


# ----------------------------------------------------------------------------------------------
# MIG and modularity: batched mutual information of discretised codes


def mutual_information_gap(codes: torch.Tensor, factors: torch.Tensor, num_bins: int = 20) -> float:
    """Discrete MIG of ``codes [N, D]`` against ``factors [N, F]`` (integer): mean over factors of
    (largest − second largest I(z_d; v_k) over latents) / H(v_k), the codes histogram-discretised
    into ``num_bins`` bins (:func:`~aelearn.metrics.information.discretize`).

    Factors that take a single value in the sample (H = 0) are left out of the mean, where
    disentanglement_lib divides 0 by 0 (NaN); a ValueError when every factor is constant.
    """
    if codes.dim() != 2 or codes.shape[1] < 2:
        raise ValueError(f"codes must be [N, D] with D ≥ 2 latents for a gap, got shape {tuple(codes.shape)}")
    mi = mutual_information(discretize(codes, num_bins), factors)
    factor_entropy = entropy(factors)
    informative = factor_entropy > 0
    if not bool(informative.any()):
        raise ValueError("factors: every factor takes a single value in the sample, MIG is undefined")
    top_two = mi.topk(2, dim=0).values
    return float(((top_two[0] - top_two[1])[informative] / factor_entropy[informative]).mean())


def mig(representation: Representation, dataset, *, num_train: int = 10000, num_bins: int = 20,
        batch_size: int = DEFAULT_BATCH_SIZE, generator: torch.Generator | None = None) -> dict[str, float]:
    """Mutual information gap (Chen et al. 2018) as disentanglement_lib's ``compute_mig``.

    ``num_train`` i.i.d. codes, each latent discretised into ``num_bins`` equal-width bins,
    plug-in MI with every factor, :func:`mutual_information_gap`. Published settings (mig.gin):
    num_train 10000, histogram discretiser with 20 bins.

    Differences from Chen et al.'s own MIG, kept as in the library: it uses the *mean*
    representation and a histogram estimate of I(z_d; v_k) (biased upwards by about
    (bins − 1)(K − 1) / 2N nats per pair, so a pure-noise code scores slightly above 0 and a
    perfect one slightly below 1), where Chen et al. estimate I from the posterior q(z|x) itself;
    the entropy normaliser H(v_k) is the plug-in entropy of the sampled factor values, not log K.

    Returns ``{"mig"}``.
    """
    _check_factor_dataset(dataset, "mig")
    _check_count(num_train, "num_train", minimum=2)
    codes, factors = sample_codes(representation, dataset, num_train, batch_size=batch_size, generator=generator)
    return {"mig": mutual_information_gap(codes, factors, num_bins)}


def modularity_score(mi: torch.Tensor) -> float:
    """Modularity (Ridgeway & Mozer 2018) from a mutual-information matrix ``[D, F]``: mean over
    latents of 1 − Σ_{k ≠ k*} I_dk² / (I_dk*² (F − 1)), k* the factor of largest MI; a latent with
    no information scores 0 (disentanglement_lib's ``modularity``). A single factor gives 1."""
    squared = mi.double() ** 2
    largest = squared.amax(1)
    if mi.shape[1] == 1:
        per_latent = torch.ones_like(largest)
    else:
        per_latent = 1 - (squared.sum(1) - largest) / (largest * (mi.shape[1] - 1))
    return float(torch.where(largest == 0, 0.0, per_latent).mean())


def _one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> float:
    """Macro ROC-AUC of ``probabilities [N, K]`` (columns ``classes``) against ``labels``, over the
    classes with both positives and negatives among ``labels``."""
    from sklearn.metrics import roc_auc_score

    indicator = labels[:, None] == classes[None, :]
    usable = indicator.any(0) & ~indicator.all(0)
    if not usable.any():
        raise ValueError("explicitness needs at least two classes of a factor among the points scored")
    return float(roc_auc_score(indicator[:, usable], probabilities[:, usable], average="macro"))


def modularity_explicitness(representation: Representation, dataset, *, num_train: int = 10000,
                            num_test: int = 5000, num_bins: int = 20, batch_size: int = DEFAULT_BATCH_SIZE,
                            generator: torch.Generator | None = None) -> dict[str, float]:
    """Modularity and explicitness (Ridgeway & Mozer 2018), disentanglement_lib's ``compute_modularity_explicitness``.

    Modularity: :func:`modularity_score` of the batched MI between the ``num_bins``-discretised
    training codes and the factors. Explicitness: per factor, a default
    ``sklearn.linear_model.LogisticRegression`` on the codes standardised with the training mean
    and standard deviation, scored by the one-vs-rest ROC-AUC of its probabilities, averaged over
    classes and then factors, on the training and on the test codes.

    Published settings (modularity_explicitness.gin): num_train 10000, num_test 5000, 20 bins.
    Quirks of the library handled here: it binarises the labels with a ``MultiLabelBinarizer`` fitted
    separately on each set, so a class absent from the test sample misaligns the columns with the
    classifier's and ``roc_auc_score`` fails; here the columns are the classifier's classes and a
    class absent from (or the only one in) a set is left out of that set's average. A latent of
    zero training variance is divided by 1, not 0 (the library's NaN).

    Returns ``{"modularity", "explicitness_train", "explicitness_test"}``.
    """
    _check_factor_dataset(dataset, "modularity_explicitness")
    _check_count(num_train, "num_train", minimum=2)
    _check_count(num_test, "num_test")
    convergence_warning = _sklearn()
    from sklearn.linear_model import LogisticRegression

    train_codes, train_factors = sample_codes(representation, dataset, num_train, batch_size=batch_size, generator=generator)
    test_codes, test_factors = sample_codes(representation, dataset, num_test, batch_size=batch_size, generator=generator)
    _check_classes(train_factors, dataset, num_train)
    modularity = modularity_score(mutual_information(discretize(train_codes, num_bins), train_factors))
    train_x, test_x = _standardise(train_codes, test_codes)
    seed = _sklearn_seed(generator)
    scores_train, scores_test = [], []
    for j in range(train_factors.shape[1]):
        train_y, test_y = train_factors[:, j].numpy(), test_factors[:, j].numpy()
        model = _fit_quietly(LogisticRegression(random_state=seed), train_x, train_y, convergence_warning)
        scores_train.append(_one_vs_rest_auc(train_y, model.predict_proba(train_x), model.classes_))
        scores_test.append(_one_vs_rest_auc(test_y, model.predict_proba(test_x), model.classes_))
    return {
        "modularity": modularity,
        "explicitness_train": float(np.mean(scores_train)),
        "explicitness_test": float(np.mean(scores_test)),
    }


# ----------------------------------------------------------------------------------------------
# DCI and SAP: classifiers per factor / per (latent, factor) pair


def dci_scores(importance: torch.Tensor) -> tuple[float, float]:
    """(disentanglement, completeness) of an importance matrix ``R [D, F]`` (Eastwood & Williams 2018).

    Disentanglement: Σ_d ρ_d (1 − H_F(P_d·)), P_d· = row d normalised, ρ_d = row d's share of the
    total importance, H_F the entropy in base F. Completeness: the same over columns, base D. As
    disentanglement_lib: 1e-11 is added to every entry before normalising, and an all-zero matrix
    weighs codes (factors) equally. With a single factor (latent) its base-1 entropy is taken as 0.
    """
    importance = importance.double()
    weights = importance if float(importance.sum()) > 0 else torch.ones_like(importance)

    def score(matrix: torch.Tensor, weight: torch.Tensor) -> float:
        p = (matrix + 1e-11) / (matrix + 1e-11).sum(1, keepdim=True)
        if matrix.shape[1] == 1:
            per_row = torch.ones(matrix.shape[0], dtype=torch.float64)
        else:
            per_row = 1 + (p * torch.log(p)).sum(1) / np.log(matrix.shape[1])
        return float((per_row * weight.sum(1) / weight.sum()).sum())

    return score(importance, weights), score(importance.T, weights.T)


DCI_CLASSIFIERS = ("gbt", "random_forest", "lasso")


def _dci_model(classifier: str, seed: int):
    if classifier == "gbt":
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(random_state=seed)
    if classifier == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(random_state=seed)
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(l1_ratio=1.0, C=0.1, solver="saga", max_iter=1000, random_state=seed)


def dci(representation: Representation, dataset, *, num_train: int = 10000, num_test: int = 5000,
        classifier: str = "gbt", batch_size: int = DEFAULT_BATCH_SIZE,
        generator: torch.Generator | None = None) -> dict[str, float]:
    """DCI disentanglement, completeness and informativeness (Eastwood & Williams 2018), disentanglement_lib's ``compute_dci``.

    One classifier per factor predicts it from all latents; the importance matrix R [D, F] holds
    |feature importance| of each latent for each factor; :func:`dci_scores` turns it into
    disentanglement and completeness; informativeness is the classifier's accuracy on the training
    and on the test codes (the library calls these "errors" but returns accuracies, kept here).

    ``classifier``: ``"gbt"`` (default, the library's ``GradientBoostingClassifier()`` with sklearn
    defaults: 100 stages, depth 3, impurity importances); not defaults of the library:
    ``"random_forest"`` (``RandomForestClassifier()``, impurity importances) and ``"lasso"``
    (L1-penalised multinomial logistic regression, C = 0.1, on standardised codes, importance =
    Σ over classes |coefficient|: the classification analogue of Eastwood & Williams' lasso).

    Published settings (dci.gin): num_train 10000, num_test 5000, gbt.
    Returns ``{"disentanglement", "completeness", "informativeness_train", "informativeness_test"}``.
    """
    _check_factor_dataset(dataset, "dci")
    _check_count(num_train, "num_train", minimum=2)
    _check_count(num_test, "num_test")
    if classifier not in DCI_CLASSIFIERS:
        raise ValueError(f"classifier must be one of {', '.join(DCI_CLASSIFIERS)}, got {classifier!r}")
    convergence_warning = _sklearn()
    train_codes, train_factors = sample_codes(representation, dataset, num_train, batch_size=batch_size, generator=generator)
    test_codes, test_factors = sample_codes(representation, dataset, num_test, batch_size=batch_size, generator=generator)
    _check_classes(train_factors, dataset, num_train)
    if classifier == "lasso":
        train_x, test_x = _standardise(train_codes, test_codes)
    else:
        train_x, test_x = train_codes.numpy(), test_codes.numpy()
    seed = _sklearn_seed(generator)
    importance = torch.zeros(train_x.shape[1], train_factors.shape[1], dtype=torch.float64)
    accuracy_train, accuracy_test = [], []
    for j in range(train_factors.shape[1]):
        train_y, test_y = train_factors[:, j].numpy(), test_factors[:, j].numpy()
        model = _fit_quietly(_dci_model(classifier, seed), train_x, train_y, convergence_warning)
        if classifier == "lasso":
            importance[:, j] = torch.from_numpy(np.abs(model.coef_).sum(0))
        else:
            importance[:, j] = torch.from_numpy(np.abs(model.feature_importances_))
        accuracy_train.append(np.mean(model.predict(train_x) == train_y))
        accuracy_test.append(np.mean(model.predict(test_x) == test_y))
    disentanglement, completeness = dci_scores(importance)
    return {
        "disentanglement": disentanglement,
        "completeness": completeness,
        "informativeness_train": float(np.mean(accuracy_train)),
        "informativeness_test": float(np.mean(accuracy_test)),
    }


def sap_gap(scores: torch.Tensor) -> float:
    """Mean over factors of the gap between the two best latents' scores, ``scores [D, F]``, D ≥ 2."""
    if scores.shape[0] < 2:
        raise ValueError(f"SAP needs at least 2 latents for a gap, got {scores.shape[0]}")
    top_two = scores.double().topk(2, dim=0).values
    return float((top_two[0] - top_two[1]).mean())


def sap(representation: Representation, dataset, *, num_train: int = 10000, num_test: int = 5000,
        continuous_factors: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
        generator: torch.Generator | None = None) -> dict[str, float]:
    """Separated attribute predictability (Kumar et al. 2018), disentanglement_lib's ``compute_sap``.

    Score matrix S [D, F], then :func:`sap_gap`. Discrete path (``continuous_factors=False``, the
    published setting): S_dk = test accuracy of ``LinearSVC(C=0.01, class_weight="balanced")``
    fitted on latent d alone to predict factor k, one classifier per pair as the protocol is.
    Continuous path: S_dk = squared correlation of latent d and factor k on the training codes
    (0 where the latent's variance ≤ 1e-12), computed for all pairs at once; the test codes are not
    used there, as in the library (and a constant factor gives NaN there too).

    Kumar et al. score continuous attributes by R² and discrete ones by classification accuracy; the
    library picks one path for all factors, and its published config uses the discrete one even for
    dSprites' ordinal factors (so a perfect 1-D code of a K-class factor is limited by what a linear
    one-vs-rest SVM on one feature can separate). LinearSVC gets a ``random_state`` (the library
    passes none) and its convergence warning is silenced.

    Published settings (sap_score.gin): num_train 10000, num_test 5000, continuous_factors False.
    Returns ``{"sap"}``.
    """
    _check_factor_dataset(dataset, "sap")
    _check_count(num_train, "num_train", minimum=2)
    _check_count(num_test, "num_test")
    if not isinstance(continuous_factors, bool):
        raise TypeError(f"continuous_factors must be a bool, got {type(continuous_factors).__name__}")
    train_codes, train_factors = sample_codes(representation, dataset, num_train, batch_size=batch_size, generator=generator)
    if continuous_factors:
        codes = train_codes - train_codes.mean(0)
        factors = train_factors.double() - train_factors.double().mean(0)
        covariance = codes.T @ factors / (num_train - 1)
        code_variance = (codes**2).sum(0) / (num_train - 1)
        factor_variance = (factors**2).sum(0) / (num_train - 1)
        scores = covariance**2 / (code_variance[:, None] * factor_variance[None, :])
        return {"sap": sap_gap(torch.where(code_variance[:, None] > 1e-12, scores, 0.0))}
    convergence_warning = _sklearn()
    from sklearn.svm import LinearSVC

    test_codes, test_factors = sample_codes(representation, dataset, num_test, batch_size=batch_size, generator=generator)
    _check_classes(train_factors, dataset, num_train)
    seed = _sklearn_seed(generator)
    scores = torch.zeros(train_codes.shape[1], train_factors.shape[1], dtype=torch.float64)
    for d in range(train_codes.shape[1]):
        for j in range(train_factors.shape[1]):
            model = _fit_quietly(LinearSVC(C=0.01, class_weight="balanced", random_state=seed),
                                 train_codes[:, d : d + 1].numpy(), train_factors[:, j].numpy(), convergence_warning)
            scores[d, j] = float(np.mean(model.predict(test_codes[:, d : d + 1].numpy()) == test_factors[:, j].numpy()))
    return {"sap": sap_gap(scores)}


# ----------------------------------------------------------------------------------------------
# Unsupervised scores


def _unsupervised_codes(representation, dataset, num_train: int, batch_size: int, generator) -> torch.Tensor:
    """``num_train`` codes of images drawn i.i.d.: from the factors of a FactorDataset, uniformly
    (with replacement) from an image tensor ``[N, C, H, W]`` or a map-style dataset of ``(image, ...)``."""
    if _has_factors(dataset):
        return sample_codes(representation, dataset, num_train, batch_size=batch_size, generator=generator)[0]
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 4 or len(dataset) == 0:
            raise ValueError(f"dataset as a tensor must be non-empty images [N, C, H, W], got shape {tuple(dataset.shape)}")
        take = lambda index: dataset[index]  # noqa: E731
    elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        take = lambda index: torch.stack([dataset[i][0] for i in index.tolist()])  # noqa: E731
    else:
        raise TypeError(f"dataset must be a FactorDataset, an image tensor or a map-style dataset, got {type(dataset).__name__}")
    index = torch.randint(len(dataset), (num_train,), generator=generator)
    return torch.cat([_represent(representation, take(chunk), batch_size) for chunk in index.split(batch_size)])


def unsupervised(representation: Representation, dataset, *, num_train: int = 10000, num_bins: int = 20,
                 active_threshold: float = 1e-2, batch_size: int = DEFAULT_BATCH_SIZE,
                 generator: torch.Generator | None = None) -> dict[str, float]:
    """Unsupervised scores of the mean representation (disentanglement_lib's ``unsupervised_metrics``).

    From ``num_train`` i.i.d. codes: ``gaussian_total_correlation`` (of the Gaussian with their
    sample covariance, :func:`~aelearn.metrics.information.gaussian_total_correlation`),
    ``mutual_info_score`` (mean plug-in MI between distinct latents after ``num_bins``
    discretisation, all pairs batched; 0 with a single latent, where the library divides by 0) and
    ``active_units`` (Burda et al. 2016: latents whose variance exceeds ``active_threshold``; not
    part of the library). The library's Gaussian Wasserstein correlation is not computed.
    Needs no factors: ``dataset`` may also be an image tensor or a map-style dataset.

    Published settings (unsupervised_metrics.gin): num_train 10000, 20 bins.
    Returns ``{"gaussian_total_correlation", "mutual_info_score", "active_units"}``.
    """
    _check_count(num_train, "num_train", minimum=2)
    _check_count(batch_size, "batch_size")
    _check_generator(generator)
    codes = _unsupervised_codes(representation, dataset, num_train, batch_size, generator)
    num_latents = codes.shape[1]
    labels = discretize(codes, num_bins)
    mi = mutual_information(labels, labels)
    pairs = num_latents**2 - num_latents
    return {
        "gaussian_total_correlation": gaussian_total_correlation(codes),
        "mutual_info_score": float((mi.sum() - mi.diagonal().sum()) / pairs) if pairs else 0.0,
        "active_units": float(active_units(codes, active_threshold).count),
    }


# ----------------------------------------------------------------------------------------------
# Several metrics by name

METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "beta_vae": beta_vae_score,
    "factor_vae": factor_vae_score,
    "mig": mig,
    "dci": dci,
    "sap": sap,
    "modularity": modularity_explicitness,
    "unsupervised": unsupervised,
}


def compute_metrics(representation: Representation, dataset, metrics: list[str] | None = None, *,
                    generator: torch.Generator | None = None, **overrides) -> dict[str, dict[str, float]]:
    """``{name: scores}`` for each metric of ``metrics`` (names of :data:`METRICS`, in that order).

    ``metrics=None``: all of them when ``dataset`` has factors, else ``["unsupervised"]``.
    ``overrides``: options such as ``num_train=1000`` go to every selected metric that accepts them
    (a TypeError when none does); an option given as ``name={...}`` (e.g.
    ``beta_vae={"batch_size": 32}``) goes to metric ``name`` only and wins over the shared ones.
    Mind that ``batch_size`` means the group size for ``beta_vae``/``factor_vae`` (a protocol
    setting) and the representation batch for the others.

    Each metric gets its own generator seeded from one draw of ``generator`` plus the metric's
    position in :data:`METRICS`, so a metric's score does not depend on which others run.
    """
    _check_generator(generator)
    if metrics is None:
        metrics = list(METRICS) if _has_factors(dataset) else ["unsupervised"]
    if isinstance(metrics, str) or not all(isinstance(name, str) for name in metrics):
        raise TypeError(f"metrics must be a list of metric names or None, got {metrics!r}")
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    per_metric = {name: overrides.pop(name) for name in list(overrides) if name in METRICS}
    for name, options in per_metric.items():
        if not isinstance(options, dict):
            raise TypeError(f"{name} options must be a dict, got {type(options).__name__}")
    accepted = {name: set(inspect.signature(METRICS[name]).parameters) - {"representation", "dataset", "generator"}
                for name in metrics}
    unused = sorted(key for key in overrides if not any(key in accepted[name] for name in metrics))
    if unused:
        raise TypeError(f"option(s) {', '.join(unused)} are accepted by none of the metrics {', '.join(metrics)}")
    for name, options in per_metric.items():
        wrong = sorted(set(options) - accepted.get(name, set(options)))
        if wrong:
            raise TypeError(f"{name} does not accept option(s) {', '.join(wrong)}")
    base_seed = int(torch.randint(2**62, (1,), generator=generator))
    results = {}
    for name in metrics:
        options = {key: value for key, value in overrides.items() if key in accepted[name]}
        options.update(per_metric.get(name, {}))
        metric_generator = torch.Generator().manual_seed(base_seed + list(METRICS).index(name))
        results[name] = METRICS[name](representation, dataset, generator=metric_generator, **options)
    return results
