"""The VectorQuantizer layer: straight-through, losses, EMA, k-means, revival, residual stack, state,
distributed replicas, and a small VQ autoencoder that trains with high codebook usage."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import aelearn.losses
from aelearn.layers import ResidualVectorQuantizer, VectorQuantizer

import vq_distributed_worker as worker


def clustered(n: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(clusters, dim, generator=g)
    picks = torch.randint(clusters, (n,), generator=g)
    return centres[picks] + spread * torch.randn(n, dim, generator=g), centres


def test_outputs_channel_last_and_channel_first():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 3, 4, requires_grad=True)
    last = VectorQuantizer(16, 4, kmeans_init=False)
    codebook = last.codebook.clone()
    out = last(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 5, 3) and out.indices.dtype == torch.int64
    # Training mode: exactly the codes of the codebook the step searched (updated afterwards).
    assert torch.equal(out.quantized.detach(), codebook[out.indices])
    assert not torch.equal(last.codebook, codebook)
    first = VectorQuantizer(16, 5, channel_dim=1).eval()
    out = first(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 4)
    assert torch.equal(out.quantized.detach().movedim(1, -1), first.codebook[out.indices])


def test_straight_through_gradient_and_commitment_loss():
    torch.manual_seed(1)
    layer = VectorQuantizer(8, 3, commitment=0.3, kmeans_init=False, dead_code_threshold=0.0).eval()
    z = torch.randn(50, 3, dtype=torch.float32, requires_grad=True)
    out = layer(z)
    weights = torch.randn(50, 3)
    (grad_st,) = torch.autograd.grad((out.quantized * weights).sum(), z)
    assert torch.equal(grad_st, weights)
    codes = layer.codebook[out.indices]
    torch.testing.assert_close(out.loss, 0.3 * (z - codes).pow(2).mean())
    (grad_loss,) = torch.autograd.grad(out.loss, z)
    torch.testing.assert_close(grad_loss, 0.3 * 2 * (z - codes).detach() / z.numel())


def test_codebook_learned_by_gradient():
    torch.manual_seed(2)
    layer = VectorQuantizer(8, 3, ema_decay=None, kmeans_init=False, dead_code_threshold=0.0)
    assert isinstance(layer.codebook, nn.Parameter)
    z = torch.randn(40, 3)
    out = layer(z)
    codes = layer.codebook[out.indices].detach()
    torch.testing.assert_close(out.loss, 1.25 * (z - codes).pow(2).mean())
    out.loss.backward()
    want = torch.zeros(8, 3).index_add_(0, out.indices, 2 * (codes - z) / z.numel())
    torch.testing.assert_close(layer.codebook.grad, want)


def test_ema_update_matches_a_float64_computation():
    torch.manual_seed(3)
    decay, eps = 0.9, 1e-3
    layer = VectorQuantizer(6, 2, ema_decay=decay, epsilon=eps, kmeans_init=False, dead_code_threshold=0.0)
    codebook = layer.codebook.double().clone()
    size, total = torch.ones(6, dtype=torch.float64), codebook.clone()
    for step in range(3):
        z = torch.randn(30, 2) + step
        out = layer(z)
        distances = ((z.double()[:, None] - codebook[None]) ** 2).sum(-1)
        assert torch.equal(out.indices, distances.argmin(1))
        one_hot = nn.functional.one_hot(out.indices, 6).double()
        size = decay * size + (1 - decay) * one_hot.sum(0)
        total = decay * total + (1 - decay) * one_hot.T @ z.double()
        n = size.sum()
        codebook = total / ((size + eps) / (n + 6 * eps) * n)[:, None]
        torch.testing.assert_close(layer.cluster_size.double(), size, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.codebook.double(), codebook, rtol=1e-5, atol=1e-6)


def test_eval_mode_leaves_the_codebook_alone():
    torch.manual_seed(4)
    layer = VectorQuantizer(10, 3, kmeans_init=True)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(100, 3))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_kmeans_initialisation_finds_the_clusters():
    """Lloyd from distinct batch vectors: with twice as many codes as clusters, every cluster gets a
    code at its centre, and every code is used."""
    torch.manual_seed(5)
    z, centres = clustered(2000, 4, 8)
    layer = VectorQuantizer(16, 4, kmeans_iters=20, dead_code_threshold=0.0)
    out = layer(z)
    assert bool(layer.initialized)
    nearest = torch.cdist(centres, layer.codebook).min(1).values
    assert float(nearest.max()) < 0.1, nearest
    assert float(out.usage) == 1.0 and float(out.perplexity) > 7.5
    assert float((out.quantized - z).pow(2).sum(1).mean()) < 4 * 0.05**2 * 2


def test_dead_codes_are_revived_from_the_batch():
    torch.manual_seed(6)
    z, _ = clustered(64, 3, 2)
    layer = VectorQuantizer(16, 3, kmeans_init=False, dead_code_threshold=1.0)
    with torch.no_grad():
        layer.codebook.fill_(100.0)
        layer.codebook[0] = 0.0
        layer.embed_sum.copy_(layer.codebook)
    out = layer(z)
    # Code 0 took all 64 vectors; the other 15 (EMA count 0.99 < 1) are now vectors of the batch.
    assert int(out.revived) == 15
    matches = (layer.codebook[1:, None, :] == z[None]).all(-1).any(-1)
    assert bool(matches.all())
    assert torch.equal(layer.cluster_size[1:], torch.ones(15))
    off = VectorQuantizer(16, 3, kmeans_init=False, dead_code_threshold=0.0)
    assert int(off(z).revived) == 0


def test_residual_stack_refines_the_approximation():
    torch.manual_seed(7)
    z = torch.randn(3000, 8)
    errors = []
    for depth in (1, 2, 4):
        torch.manual_seed(8)
        stack = ResidualVectorQuantizer(depth, 32, 8)
        stack(z)
        out = stack.eval()(z)
        assert out.indices.shape == (3000, depth) and out.perplexity.shape == (depth,)
        codes = sum(q.codebook[out.indices[:, i]] for i, q in enumerate(stack.quantizers))
        torch.testing.assert_close(out.quantized, codes)
        errors.append(float((out.quantized - z).pow(2).mean()))
    assert errors[0] > 1.3 * errors[1] > 1.3 * 1.3 * errors[2], errors


def test_residual_commitment_trains_the_encoder_input():
    stack = ResidualVectorQuantizer(2, 4, 3, channel_dim=1)
    z = torch.randn(2, 3, 5, requires_grad=True)
    out = stack(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 5, 2)
    (grad,) = torch.autograd.grad(out.loss, z)
    assert float(grad.abs().sum()) > 0


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(9)
    layer = VectorQuantizer(12, 4)
    for _ in range(3):
        layer(torch.randn(200, 4))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = VectorQuantizer(12, 4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert bool(restored.initialized)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    z = torch.randn(50, 4)
    assert torch.equal(layer.eval()(z).indices, restored.eval()(z).indices)


def test_exported_with_the_losses():
    assert aelearn.losses.VectorQuantizer is VectorQuantizer
    assert aelearn.losses.ResidualVectorQuantizer is ResidualVectorQuantizer


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(num_codes=0, dim=3), ValueError, "num_codes must be a positive int"),
        (dict(num_codes=4, dim=3, ema_decay=1.0), ValueError, "ema_decay must be a number in"),
        (dict(num_codes=4, dim=3, commitment=-1.0), ValueError, "commitment must be a finite number"),
        (dict(num_codes=4, dim=3, dead_code_threshold=float("nan")), ValueError, "dead_code_threshold must be"),
        (dict(num_codes=4, dim=3, channel_dim=1.5), TypeError, "channel_dim must be an int"),
    ],
)
def test_bad_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        VectorQuantizer(**kwargs)


@pytest.mark.parametrize(
    "z, error, words",
    [
        (torch.randn(5, 4), ValueError, r"z must have 3 channels in dimension -1, got shape \(5, 4\)"),
        (torch.randint(0, 3, (5, 3)), TypeError, "z must be a floating-point tensor"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), ValueError, "z contains NaN or Inf"),
        (torch.tensor(1.0), ValueError, "has no dimension -1"),
    ],
)
def test_bad_input(z, error, words):
    with pytest.raises(error, match=words):
        VectorQuantizer(4, 3)(z)


class TinyVQAutoencoder(nn.Module):
    """8×8 images → 4 vectors of 8 channels → codes → 8×8 images."""

    def __init__(self, num_codes: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        self.quantizer = VectorQuantizer(num_codes, 8)
        self.decoder = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        out = self.quantizer(self.encoder(x).reshape(-1, 4, 8))
        return self.decoder(out.quantized.reshape(-1, 32)).reshape(x.shape), out


def bars(n: int, g: torch.Generator) -> torch.Tensor:
    """8×8 images of one horizontal and one vertical bar at random positions and intensities."""
    images = torch.zeros(n, 8, 8)
    rows, cols = torch.randint(8, (2, n), generator=g)
    images[torch.arange(n), rows, :] += torch.rand(n, 1, generator=g) + 0.5
    images[torch.arange(n), :, cols] += torch.rand(n, 1, generator=g) + 0.5
    return images


def test_small_vq_autoencoder_trains_with_high_codebook_usage():
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(11)
    model = TinyVQAutoencoder(num_codes=32)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses, usages = [], []
    for _ in range(300):
        x = bars(128, g)
        reconstruction, out = model(x)
        loss = (reconstruction - x).pow(2).mean() + out.loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float((reconstruction - x).detach().pow(2).mean()))
        usages.append(float(out.usage))
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.3 * start, (start, end)
    assert min(usages[-50:]) > 0.8, usages[-50:]
    model.eval()
    _, out = model(bars(512, g))
    assert float(out.perplexity) > 0.5 * 32, float(out.perplexity)


def run_replicas(tmp_path, scenario: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         worker.__file__, str(tmp_path), scenario],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_distributed_replicas_match_one_process_on_the_global_batch(tmp_path):
    replicas = run_replicas(tmp_path, "match")
    single = worker.make_layer("match")
    for batch in worker.global_batches(2):
        single(batch)
    for key, value in single.state_dict().items():
        assert torch.equal(replicas[0][key], replicas[1][key]), key
        torch.testing.assert_close(replicas[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_distributed_replicas_stay_identical_with_kmeans_and_revival(tmp_path):
    replicas = run_replicas(tmp_path, "sync")
    assert replicas[0]["revived"] > 0, "the scenario no longer revives codes"
    for key in ("codebook", "cluster_size", "embed_sum", "initialized"):
        assert torch.equal(replicas[0][key], replicas[1][key]), key
