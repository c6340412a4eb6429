"""Importance-weighted estimate of log p(x) (Burda et al. 2016, "Importance Weighted Autoencoders", eq. 8).

With the encoder q(z|x) as proposal and K codes z_k ~ q(z|x),

    log p(x) ≥ L_K(x) = logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K,

a lower bound that rises with K (monotone in expectation) to log p(x), and equals the ELBO at
K = 1. With the exact posterior as proposal every log-weight equals log p(x), and so does L_K.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aelearn.metrics.rate_distortion import check_batch_size, check_model, dataset_length, encoded_batches, evaluating, select_examples

LOG_2PI = math.log(2.0 * math.pi)


def _log_weights(model, images: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """log p(x|z) + log p(z) − log q(z|x) ``[b, k]`` for the codes z = μ + σ·ε of ``noise: [b, k, D]``.

    The decoder runs once on the ``[b·k, D]`` codes. log q(z|x) is written with ε (the Gaussian's
    own variable), not with z − μ, which would lose digits to cancellation when σ is small.
    """
    batch, samples, _ = noise.shape
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * noise
    targets = images[:, None].expand(batch, samples, *images.shape[1:]).reshape(batch * samples, *images.shape[1:])
    log_px_given_z = -model.likelihood.nll(model.decoder(z.reshape(batch * samples, -1)), targets).reshape(batch, samples)
    log_prior = -0.5 * (LOG_2PI + z.square()).sum(2)
    log_posterior = -0.5 * (LOG_2PI + logvar[:, None] + noise.square()).sum(2)
    return log_px_given_z.double() + (log_prior - log_posterior).double()


def log_likelihood(
    model: nn.Module,
    dataset,
    *,
    num_samples: int = 1000,
    num_examples: int | None = None,
    batch_size: int = 32,
    sample_batch: int = 64,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """The IWAE estimate of the mean log-likelihood of ``dataset`` under ``model``, with K = ``num_samples``.

    ``model``: ``posterior(x) -> (mu, logvar)`` ``[N, D]`` (the proposal q(z|x)), prior N(0, I),
    ``decoder(z)`` and ``likelihood.nll(output, x) -> [N]`` (an :class:`aelearn.models.VAE`).
    ``dataset``: an image tensor ``[N, C, H, W]`` or a map-style dataset; ``num_examples``: a random
    subset of that size (all when None). ``batch_size`` examples are encoded together and
    ``sample_batch`` codes of each decoded together, so the decoder sees ``[batch_size · sample_batch, D]``
    blocks. The noise ε ``[b, k, D]`` of each block is drawn from ``generator`` (after the subset),
    block after block; weights are combined by an online log-sum-exp in float64.

    Returns (floats): ``log_likelihood`` (mean L_K, nats per example), ``std_error`` (of that
    mean over examples), ``bits_per_dim`` (−log_likelihood / (C·H·W · ln 2)), ``elbo`` (the mean
    single-sample weight log p(x|z) + log p(z) − log q(z|x) over all K codes: an unbiased estimate
    of the ELBO from the same noise, the K = 1 bound), ``num_samples``, ``num_examples``.
    For a Bernoulli likelihood on grey levels, p(x|z) is not a normalised density (see
    :class:`aelearn.models.Bernoulli`) and neither is the estimate.
    """
    check_model(model)
    check_batch_size(batch_size)
    check_batch_size(sample_batch, "sample_batch")
    check_batch_size(num_samples, "num_samples")
    indices = select_examples(dataset_length(dataset), num_examples, generator)
    estimates, elbos = [], []
    with evaluating(model):
        for images, _, mu, logvar in encoded_batches(model, dataset, batch_size, indices):
            dims = math.prod(images.shape[1:])
            total = torch.full((len(images),), -math.inf, dtype=torch.float64, device=mu.device)
            weight_sum = torch.zeros(len(images), dtype=torch.float64, device=mu.device)
            for start in range(0, num_samples, sample_batch):
                samples = min(sample_batch, num_samples - start)
                noise = torch.randn((len(images), samples, mu.shape[1]), generator=generator, dtype=mu.dtype).to(mu.device)
                log_w = _log_weights(model, images, mu, logvar, noise)
                total = torch.logaddexp(total, torch.logsumexp(log_w, 1))
                weight_sum += log_w.sum(1)
            estimates.append(total - math.log(num_samples))
            elbos.append(weight_sum / num_samples)
    estimate, elbo = torch.cat(estimates), torch.cat(elbos)
    if not torch.isfinite(estimate).all():
        raise ValueError("the log-likelihood estimate is not finite: the model gave NaN or infinite likelihoods")
    count = len(estimate)
    mean = float(estimate.mean())
    std_error = float(estimate.std() / math.sqrt(count)) if count > 1 else math.nan
    return {
        "log_likelihood": mean,
        "std_error": std_error,
        "bits_per_dim": -mean / (dims * math.log(2.0)),
        "elbo": float(elbo.mean()),
        "num_samples": float(num_samples),
        "num_examples": float(count),
    }
