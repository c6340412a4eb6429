"""Evaluation estimators at full size: the ELBO decomposition over all of dSprites, IWAE with K = 1000,
and the exact entropy of dSprites.

    python benchmarks/bench_eval.py decomposition [--num-samples M]   # 737,280 posteriors, M codes
    python benchmarks/bench_eval.py likelihood                        # K = 1000 on 10,000 points
    python benchmarks/bench_eval.py entropy                           # H(X) of dSprites, exact
    python benchmarks/bench_eval.py all

* decomposition: :func:`aelearn.metrics.decomposition.elbo_decomposition` of an untrained conv64
  β-VAE with 10 latents over all 737,280 dSprites images (rendered on the fly). The timing is split
  into the encoding pass (rendering, encoder, decoding the M sampled codes) and the aggregate-
  posterior pass (the fused ``log_qz`` kernels, M × 737,280 pairs); the full M = N run is
  extrapolated from the measured pair rate when a smaller M is given. Peak memory is the process's
  resident-set high-water mark above its level before the call (``peak_memory.py``).
* likelihood: :func:`aelearn.metrics.likelihood.log_likelihood` with K = 1000 on 10,000 points
  (1,797 scikit-learn digits at 28×28, drawn with replacement) of Burda et al.'s one-stochastic-layer
  MLP VAE (784–200–200–50, Bernoulli), trained briefly first so the weights are not random.
* entropy: :func:`aelearn.metrics.rate_distortion.data_entropy` of dSprites.

A script rather than pytest-benchmark cases: each is one long call (minutes), timed once. Results
go to ``--out`` (default bench-results/eval) as ``eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from peak_memory import peak_extra_bytes

from aelearn.data import Digits, DSprites
from aelearn.metrics import decomposition
from aelearn.metrics.decomposition import elbo_decomposition
from aelearn.metrics.likelihood import log_likelihood
from aelearn.metrics.rate_distortion import data_entropy
from aelearn.models import BetaVAE, VAE
from aelearn.ops import _registry

LIKELIHOOD_EXAMPLES = 10_000
LIKELIHOOD_SAMPLES = 1000


def measured(call):
    """``(call(), seconds, peak extra bytes)`` of one call."""
    results = {}

    def run():
        start = time.perf_counter()
        results["value"] = call()
        results["seconds"] = time.perf_counter() - start

    peak = peak_extra_bytes(run)
    return results["value"], results["seconds"], peak


def bench_decomposition(num_samples: int | None, batch_size: int, chunk_size: int) -> dict:
    dataset = DSprites()
    torch.manual_seed(0)
    model = BetaVAE(dataset.observation_shape, 10, beta=4.0).eval()
    aggregate_seconds = []
    timed = decomposition.aggregate_log_density

    def timed_aggregate(*args, **kwargs):
        start = time.perf_counter()
        result = timed(*args, **kwargs)
        aggregate_seconds.append(time.perf_counter() - start)
        return result

    decomposition.aggregate_log_density = timed_aggregate
    try:
        terms, seconds, peak = measured(lambda: elbo_decomposition(
            model, dataset, num_samples=num_samples, batch_size=batch_size, chunk_size=chunk_size,
            generator=torch.Generator().manual_seed(0),
        ))
    finally:
        decomposition.aggregate_log_density = timed
    pairs = terms.num_samples * terms.dataset_size
    aggregate = aggregate_seconds[0]
    z = torch.zeros(1, 10)
    backend = _registry.select("log_qz", z.device, z.dtype, z, z, z, torch.arange(10), 10).name
    return {
        "dataset_size": terms.dataset_size,
        "num_samples": terms.num_samples,
        "latents": 10,
        "chunk_size": chunk_size,
        "log_qz_backend": backend,
        "total_s": seconds,
        "encode_s": seconds - aggregate,
        "aggregate_s": aggregate,
        "pairs_per_s": pairs / aggregate,
        "full_aggregate_s_extrapolated": terms.dataset_size**2 / (pairs / aggregate),
        "peak_extra_bytes": peak,
        "terms": terms._asdict(),
    }


def bench_likelihood(batch_size: int, sample_batch: int) -> dict:
    images = Digits(size=28).images
    torch.manual_seed(0)
    model = VAE((1, 28, 28), 50, architecture="mlp", mlp_hidden=(200, 200))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    train_start = time.perf_counter()
    for step in range(500):
        batch = images[torch.randint(len(images), (100,), generator=generator)]
        loss = model.loss(batch, step=step)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    train_seconds = time.perf_counter() - train_start
    model.eval()
    points = images[torch.randint(len(images), (LIKELIHOOD_EXAMPLES,), generator=generator)]
    estimate, seconds, peak = measured(lambda: log_likelihood(
        model, points, num_samples=LIKELIHOOD_SAMPLES, batch_size=batch_size, sample_batch=sample_batch,
        generator=torch.Generator().manual_seed(1),
    ))
    return {
        "examples": LIKELIHOOD_EXAMPLES,
        "num_samples": LIKELIHOOD_SAMPLES,
        "batch_size": batch_size,
        "sample_batch": sample_batch,
        "model": "mlp 784-200-200-50, bernoulli, 500 Adam steps",
        "train_s": train_seconds,
        "total_s": seconds,
        "decoded_codes_per_s": LIKELIHOOD_EXAMPLES * LIKELIHOOD_SAMPLES / seconds,
        "peak_extra_bytes": peak,
        "estimate": estimate,
    }


def bench_entropy() -> dict:
    dataset = DSprites()
    start = time.perf_counter()
    entropy = data_entropy(dataset)
    seconds = time.perf_counter() - start
    return {"entropy_nats": entropy, "log_n": math.log(len(dataset)), "total_s": seconds}


def markdown(results: dict) -> str:
    lines = [f"# Evaluation estimators ({torch.get_num_threads()} threads)", ""]
    if "decomposition" in results:
        r = results["decomposition"]
        lines += [
            "## ELBO decomposition, dSprites, conv64 β-VAE (untrained), 10 latents",
            "",
            f"- posteriors N = {r['dataset_size']:,}, codes M = {r['num_samples']:,}, chunk {r['chunk_size']}, log_qz backend {r['log_qz_backend']}",
            f"- encoding pass (render + encode N, decode M): {r['encode_s']:.1f} s",
            f"- aggregate posterior (M × N pairs): {r['aggregate_s']:.1f} s, {r['pairs_per_s'] / 1e9:.2f} G pairs/s",
            f"- total {r['total_s']:.1f} s; full M = N aggregate pass extrapolated: {r['full_aggregate_s_extrapolated'] / 60:.1f} min",
            f"- peak extra memory: {r['peak_extra_bytes'] / 2**20:.0f} MiB",
            "- terms (nats): " + ", ".join(f"{k} {v:.4f}" for k, v in r["terms"].items() if isinstance(v, float)),
            "",
        ]
    if "likelihood" in results:
        r = results["likelihood"]
        e = r["estimate"]
        lines += [
            f"## IWAE log-likelihood, K = {r['num_samples']}, {r['examples']:,} points",
            "",
            f"- model: {r['model']} (training {r['train_s']:.1f} s)",
            f"- time: {r['total_s']:.1f} s ({r['decoded_codes_per_s']:,.0f} codes/s), blocks {r['batch_size']} × {r['sample_batch']}",
            f"- log p(x) ≥ {e['log_likelihood']:.3f} ± {e['std_error']:.3f} nats, ELBO {e['elbo']:.3f}",
            f"- peak extra memory: {r['peak_extra_bytes'] / 2**20:.0f} MiB",
            "",
        ]
    if "entropy" in results:
        r = results["entropy"]
        lines += ["## H(X) of dSprites", "", f"- {r['entropy_nats']:.6f} nats (log N = {r['log_n']:.6f}), {r['total_s']:.1f} s", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["decomposition", "likelihood", "entropy", "all"])
    parser.add_argument("--num-samples", type=int, default=None, help="codes of the decomposition (default: all N)")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=512, help="images per encoder call of the decomposition")
    parser.add_argument("--iwae-batch", type=int, default=50, help="examples per IWAE block")
    parser.add_argument("--iwae-sample-batch", type=int, default=200, help="codes per example per IWAE block")
    parser.add_argument("--out", default="bench-results/eval")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["threads"] = torch.get_num_threads()
    results["load_average"] = os.getloadavg()[0]
    if args.what in ("decomposition", "all"):
        results["decomposition"] = bench_decomposition(args.num_samples, args.batch_size, args.chunk_size)
    if args.what in ("likelihood", "all"):
        results["likelihood"] = bench_likelihood(args.iwae_batch, args.iwae_sample_batch)
    if args.what in ("entropy", "all"):
        results["entropy"] = bench_entropy()
    path.write_text(json.dumps(results, indent=2))
    (out / "eval.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
