"""One replica of the distributed trainer test (run by torchrun from test_train.py).

Usage: torchrun --standalone --nproc_per_node=2 train_distributed_worker.py OUT_DIR
Joins the process group as aelearn.train.train does (a group cannot be joined twice in one
torchrun launch), then trains two runs with aelearn.train.train: "match", a deterministic
autoencoder comparable with one process on the same global batch, and "vae", a β-VAE whose
replicas draw different noise. Each replica saves its trained parameters to OUT_DIR/<run>-rank<r>.pt.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from aelearn.models import BetaVAE, Model
from aelearn.train import TrainConfig, distributed, train

GLOBAL_BATCH, STEPS = 16, 6


class DeterministicAutoencoder(Model):
    """No noise: its training depends only on the batches, as one process's does."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 16), nn.Unflatten(1, (1, 4, 4)))

    def loss(self, batch, *, step):
        x = batch[0]
        reconstruction = (self.decoder(self.encoder(x)) - x).square().flatten(1).sum(1).mean()
        return {"loss": reconstruction, "reconstruction": reconstruction}


def make_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.rand(40, 1, 4, 4, generator=g))


def make_model(run: str) -> nn.Module:
    torch.manual_seed(0)
    if run == "match":
        return DeterministicAutoencoder()
    return BetaVAE((1, 4, 4), 2, mlp_hidden=(8,))


def make_config(run_dir, run: str) -> TrainConfig:
    return TrainConfig(
        run_dir=str(run_dir), steps=STEPS, batch_size=GLOBAL_BATCH, lr=0.05 if run == "match" else 1e-2, grad_clip=1.0,
        log_every=2, checkpoint_every=3, image_every=0, progress=False, tensorboard="off",
    )


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    assert distributed.start("cpu"), "torchrun's environment should start a gloo group"
    for run in ("match", "vae"):
        model = make_model(run)
        train(make_config(f"{out_dir}/{run}", run), model=model, dataset=make_dataset())
        assert dist.is_initialized(), "train() must leave alone a process group it did not start"
        torch.save(model.state_dict(), f"{out_dir}/{run}-rank{os.environ['RANK']}.pt")
    distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1])
