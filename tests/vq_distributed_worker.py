"""One replica of the distributed VectorQuantizer test (run by torchrun from test_vector_quantizer.py).

Usage: torchrun --standalone --nproc_per_node=2 vq_distributed_worker.py OUT_DIR SCENARIO
Every replica quantises its half of the same global batches and saves its layer's state to
OUT_DIR/rank<r>.pt. SCENARIO "match": no k-means, no revival (comparable with one process on the
global batch); "sync": k-means and revival on, each replica with its own random stream.
"""

import sys

import torch
import torch.distributed as dist

from aelearn.layers import VectorQuantizer

NUM_CODES, DIM, ROWS_PER_REPLICA, STEPS = 24, 6, 40, 6


def global_batches(world_size: int):
    g = torch.Generator().manual_seed(123)
    centres = 3 * torch.randn(8, DIM, generator=g)
    for _ in range(STEPS):
        picks = torch.randint(len(centres), (ROWS_PER_REPLICA * world_size,), generator=g)
        yield centres[picks] + 0.3 * torch.randn(len(picks), DIM, generator=g)


def make_layer(scenario: str) -> VectorQuantizer:
    torch.manual_seed(0)
    if scenario == "match":
        return VectorQuantizer(NUM_CODES, DIM, kmeans_init=False, dead_code_threshold=0.0)
    return VectorQuantizer(NUM_CODES, DIM, kmeans_init=True, dead_code_threshold=2.0)


def main(out_dir: str, scenario: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layer = make_layer(scenario)
    torch.manual_seed(1000 + rank)
    revived = 0
    for batch in global_batches(world):
        out = layer(batch[rank::world])
        revived += int(out.revived)
    torch.save({**layer.state_dict(), "revived": revived}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
