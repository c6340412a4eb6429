"""Evaluation: disentanglement metrics, the ELBO decomposition, likelihood, rate–distortion, pictures.

- :mod:`aelearn.metrics.disentanglement`: BetaVAE, FactorVAE, MIG, DCI, SAP, modularity and
  explicitness, unsupervised scores — disentanglement_lib's published protocols by default — and
  :func:`compute_metrics`; :mod:`aelearn.metrics.information` their batched building blocks.
- :mod:`aelearn.metrics.decomposition`: index-code MI, total correlation and dimension-wise KL over
  a whole dataset with the exact aggregate posterior (fused ``log_qz`` kernels, in chunks).
- :mod:`aelearn.metrics.likelihood`: the importance-weighted (IWAE) log-likelihood bound.
- :mod:`aelearn.metrics.rate_distortion`: rate and distortion (and the supervised variant), sweeps
  over β, the exact entropy of a dataset of ground-truth factors.
- :mod:`aelearn.metrics.pictures` and :mod:`aelearn.metrics.report`: traversals, reconstructions,
  samples, plots, and the Markdown report that ``aelearn eval`` writes.
"""

from aelearn.metrics.decomposition import ElboDecomposition, aggregate_log_density, elbo_decomposition
from aelearn.metrics.disentanglement import (
    METRICS,
    beta_vae_score,
    compute_metrics,
    dci,
    factor_vae_score,
    mig,
    modularity_explicitness,
    sap,
    unsupervised,
)
from aelearn.metrics.information import active_units, discretize, entropy, gaussian_total_correlation, mutual_information
from aelearn.metrics.likelihood import log_likelihood
from aelearn.metrics.pictures import latent_traversals, plot_metrics, plot_rate_distortion, reconstructions, samples
from aelearn.metrics.rate_distortion import (
    RatePoint,
    SupervisedRatePoint,
    data_entropy,
    rate_distortion,
    rate_distortion_supervised,
    rate_distortion_sweep,
)
from aelearn.metrics.report import write_report

__all__ = [
    "METRICS",
    "ElboDecomposition",
    "RatePoint",
    "SupervisedRatePoint",
    "active_units",
    "aggregate_log_density",
    "beta_vae_score",
    "compute_metrics",
    "data_entropy",
    "dci",
    "discretize",
    "elbo_decomposition",
    "entropy",
    "factor_vae_score",
    "gaussian_total_correlation",
    "latent_traversals",
    "log_likelihood",
    "mig",
    "modularity_explicitness",
    "mutual_information",
    "plot_metrics",
    "plot_rate_distortion",
    "rate_distortion",
    "rate_distortion_supervised",
    "rate_distortion_sweep",
    "reconstructions",
    "samples",
    "sap",
    "unsupervised",
    "write_report",
]
