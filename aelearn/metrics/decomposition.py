"""The ELBO decomposition of Chen et al. 2018 ("Isolating Sources of Disentanglement in VAEs", eq. 2
and their ``elbo_decomposition``) over a whole dataset, with the exact aggregate posterior.

With q(z) = (1/N) Σ_n q(z|x_n) the aggregate posterior of the N examples and p(z) = N(0, I):

    E_x KL(q(z|x) ‖ p(z)) = E[log q(z|x) − log q(z)]                 index-code mutual information
                          + E[log q(z) − Σ_j log q(z_j)]             total correlation
                          + E[Σ_j log q(z_j) − log p(z_j)]           dimension-wise KL

the expectations over x and z ~ q(z|x). The three terms add up, sample by sample, to log q(z|x) −
log p(z), whose mean is the Monte Carlo estimate of the KL. Here, unlike the minibatch estimates of
:func:`aelearn.ops.log_qz.tc_decomposition`, log q(z) and every log q(z_j) sum over ALL N posteriors:

    log q(z_i) = logsumexp_n log q(z_i|x_n) − log N,

evaluated by the fused ``log_qz`` kernels (all three log-weights 0: each call returns
log Σ_n q(z_i|x_n) and the D singleton marginals over one square chunk of codes and posteriors),
chunks combined by ``logaddexp`` in float64. The cost is num_samples × N × D density evaluations and
the memory O(N·D) for the posteriors plus one chunk; no N×N matrix ever exists.

Chen et al.'s ``elbo_decomposition`` draws one z per example but estimates the entropies of q(z)
and q(z_j) on a random subset of 10,000 of those codes (their ``estimate_entropies``), each against
all N posteriors; here ``num_samples`` chooses how many examples get a code (all N by default), and
q(z) likewise always sums over all N posteriors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from aelearn.metrics.rate_distortion import check_batch_size, check_model, dataset_length, encoded_batches, evaluating, select_examples
from aelearn.ops import _registry
from aelearn.ops._kernels import check_finite, check_sample
from aelearn.ops.log_qz import gaussian_log_density


class ElboDecomposition(NamedTuple):
    """The terms of the ELBO decomposition, nats per example (means over the ``num_samples`` codes)."""

    mutual_information: float  # index-code MI: E[log q(z|x) − log q(z)]
    total_correlation: float  # E[log q(z) − Σ_j log q(z_j)]
    dimensionwise_kl: float  # E[Σ_j log q(z_j) − log p(z_j)]
    kl_sum: float  # the sum of the three terms above
    sampled_kl: float  # E[log q(z|x) − log p(z)] computed directly: equals kl_sum up to rounding
    analytic_kl: float  # E KL(q(z|x) ‖ p(z)) in closed form, over the same examples
    reconstruction: float  # E −log p(x|z), the same codes z
    num_samples: int  # examples that got a code z ~ q(z|x)
    dataset_size: int  # N, the posteriors of the aggregate q(z)


def _balanced_chunks(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, size)`` of ceil(length / chunk_size) consecutive chunks whose sizes differ by at most 1."""
    count = -(-length // chunk_size)
    small, extra = divmod(length, count)
    chunks, start = [], 0
    for index in range(count):
        size = small + (index < extra)
        chunks.append((start, size))
        start += size
    return chunks


def aggregate_log_density(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *, chunk_size: int = 2048, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(z_i) ``[M]``, log q(z_ij) ``[M, D]``) float64, q the mixture of all N posteriors, exact.

    ``z: [M, D]`` codes; ``mu, logvar: [N, D]`` the posteriors of the mixture (1/N) Σ_n
    N(mu_n, diag exp(logvar_n)). The fused ``log_qz`` op takes equal numbers of codes and
    posteriors: the posteriors are cut into chunks of s or s + 1 (s ≤ ``chunk_size``), the codes into
    chunks of at most s, and a code chunk smaller than its posterior chunk is padded with copies of
    its first code whose results are dropped (the posteriors are never padded: that would change q).
    ``backend``: of the ``log_qz`` op (:func:`aelearn.ops._registry.select`).
    """
    check_batch_size(chunk_size, "chunk_size")
    for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
        check_sample(name, t)
        check_finite(name, t)
        if t.dtype != z.dtype or t.device != z.device:
            raise TypeError(f"{name} must have z's dtype and device ({z.dtype}, {z.device}), got {t.dtype}, {t.device}")
    if mu.shape != logvar.shape or mu.shape[1] != z.shape[1] or len(z) == 0 or len(mu) == 0:
        raise ValueError(f"z [M, D], mu and logvar [N, D] (M, N ≥ 1) expected, got {tuple(z.shape)}, {tuple(mu.shape)}, {tuple(logvar.shape)}")
    mu, logvar = mu.contiguous(), logvar.contiguous()
    num_codes, dim = z.shape
    posterior_chunks = _balanced_chunks(len(mu), chunk_size)
    code_chunk = posterior_chunks[-1][1]
    group_of_dim = torch.arange(dim, device=z.device)
    impl = _registry.select("log_qz", z.device, z.dtype, z, mu, logvar, group_of_dim, dim, backend=backend)
    joint = torch.full((num_codes,), -math.inf, dtype=torch.float64, device=z.device)
    marginals = torch.full((num_codes, dim), -math.inf, dtype=torch.float64, device=z.device)
    for code_start in range(0, num_codes, code_chunk):
        codes = z[code_start : code_start + code_chunk]
        rows = len(codes)
        chunk_joint, chunk_marginals = joint[code_start : code_start + rows], marginals[code_start : code_start + rows]
        for start, size in posterior_chunks:
            padded = codes if rows == size else torch.cat([codes, codes[:1].expand(size - rows, dim)])
            lse_joint, lse_marginals = impl.forward(
                padded.contiguous(), mu[start : start + size], logvar[start : start + size], group_of_dim, dim, 0.0, 0.0, 0.0
            )
            torch.logaddexp(chunk_joint, lse_joint[:rows].double(), out=chunk_joint)
            torch.logaddexp(chunk_marginals, lse_marginals[:rows].double(), out=chunk_marginals)
    log_n = math.log(len(mu))
    return joint - log_n, marginals - log_n


def elbo_decomposition(
    model: nn.Module,
    dataset,
    *,
    num_samples: int | None = None,
    batch_size: int = 256,
    chunk_size: int = 2048,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> ElboDecomposition:
    """Index-code MI, total correlation and dimension-wise KL of ``model`` on all of ``dataset``.

    ``model``: ``posterior(x) -> (mu, logvar)`` ``[N, D]`` (Gaussian q(z|x), prior N(0, I)),
    ``decoder(z)`` and ``likelihood.nll(output, x) -> [N]`` (an :class:`aelearn.models.VAE`).
    ``dataset``: an image tensor ``[N, C, H, W]`` or a map-style dataset (a FactorDataset, ...),
    encoded in batches of ``batch_size``; all N posteriors are kept (O(N·D) memory).
    ``num_samples``: how many examples, drawn without replacement by ``generator``, get one code
    z ~ q(z|x) each (all N when None); the cost grows as num_samples × N. ``chunk_size``: codes and
    posteriors per ``log_qz`` call (memory O(chunk_size·D)); ``backend``: that op's backend.
    The codes are drawn in dataset order from ``generator``, so the same seed gives the same result.
    Densities are evaluated in the model's dtype, their sums in float64.
    """
    check_model(model)
    check_batch_size(batch_size)
    length = dataset_length(dataset)
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)):
        raise TypeError(f"num_samples must be an int or None, got {type(num_samples).__name__}")
    if num_samples is not None and not 1 <= num_samples <= length:
        raise ValueError(f"num_samples must lie in [1, {length}] (one code per example at most), got {num_samples}")
    chosen = torch.zeros(length, dtype=torch.bool)
    subset = select_examples(length, num_samples, generator)
    chosen[slice(None) if subset is None else subset] = True
    # What is kept ([N, D] posteriors, [M, D] codes) is allocated once, at the first batch: small
    # tensors kept per batch between the decoder's large temporary outputs fragment the heap, which
    # then grows by about one decoder output per batch (17 GiB over dSprites).
    kept: dict[str, torch.Tensor] = {}
    reconstruction = 0.0
    start = code_start = 0
    with evaluating(model):
        for images, _, mu, logvar in encoded_batches(model, dataset, batch_size):
            if not kept:
                count = int(chosen.sum())
                kept = {name: mu.new_empty(rows, mu.shape[1]) for name, rows in
                        (("mu", length), ("logvar", length), ("z", count), ("z_mu", count), ("z_logvar", count))}
            keep = chosen[start : start + len(images)].to(mu.device)
            kept["mu"][start : start + len(images)] = mu
            kept["logvar"][start : start + len(images)] = logvar
            start += len(images)
            if keep.any():
                rows = slice(code_start, code_start + int(keep.sum()))
                code_start = rows.stop
                noise = torch.randn((rows.stop - rows.start, mu.shape[1]), generator=generator, dtype=mu.dtype).to(mu.device)
                z = kept["z"][rows]
                torch.addcmul(mu[keep], torch.exp(0.5 * logvar[keep]), noise, out=z)
                reconstruction += float(model.likelihood.nll(model.decoder(z), images[keep]).double().sum())
                kept["z_mu"][rows] = mu[keep]
                kept["z_logvar"][rows] = logvar[keep]
    mu, logvar, z, z_mu, z_logvar = (kept[name] for name in ("mu", "logvar", "z", "z_mu", "z_logvar"))
    log_qz, log_qz_dims = aggregate_log_density(z, mu, logvar, chunk_size=chunk_size, backend=backend)
    z, z_mu, z_logvar = z.double(), z_mu.double(), z_logvar.double()
    log_q_given_x = gaussian_log_density(z, z_mu, z_logvar)
    log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
    marginal_sum = log_qz_dims.sum(1)
    terms = {
        "mutual_information": (log_q_given_x - log_qz).mean(),
        "total_correlation": (log_qz - marginal_sum).mean(),
        "dimensionwise_kl": (marginal_sum - log_prior).mean(),
    }
    count = len(z)
    return ElboDecomposition(
        **{name: float(value) for name, value in terms.items()},
        kl_sum=float(sum(terms.values())),
        sampled_kl=float((log_q_given_x - log_prior).mean()),
        analytic_kl=float((0.5 * (z_mu.square() + z_logvar.exp() - 1.0 - z_logvar).sum(1)).mean()),
        reconstruction=reconstruction / count,
        num_samples=count,
        dataset_size=length,
    )
