"""Data-parallel training across processes started by ``torchrun``: gloo on the CPU, NCCL on GPUs.

Each process (replica) computes the losses of its share of the global batch and the replicas
average their gradients before the optimisers step, so every replica takes the same step and the
parameters stay identical. The trainer does the averaging itself rather than through
``DistributedDataParallel``: DDP hooks ``forward()`` and expects one backward pass per forward,
while the model protocol computes its losses with ``loss()`` and back-propagates one loss per
optimiser group. The averaging is one all-reduce of all gradients flattened into one buffer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class Replicas:
    """This process's place among the replicas (rank 0 of 1 outside torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_type: str) -> bool:
    """Join the process group torchrun describes in the environment (NCCL for CUDA, else gloo);
    True when this call created it (and should end it with :func:`stop`)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


def stop() -> None:
    dist.destroy_process_group()


def current() -> Replicas:
    if dist.is_available() and dist.is_initialized():
        return Replicas(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Replicas()


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every replica."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: list[nn.Parameter], world_size: int) -> None:
    """Replace every gradient by its mean over the replicas, one all-reduce per dtype.

    A parameter without a gradient on some replicas (a branch its batch did not take, e.g. a
    classifier on a batch without labels) averages zeros there; one without a gradient on every
    replica keeps none, as in one process, so its optimiser skips it. Presence flags travel in the
    gradients' buffer; they are read (a device synchronisation) only where a gradient was missing.
    """
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for parameter in parameters:
        by_dtype.setdefault(parameter.dtype, []).append(parameter)
    for group in by_dtype.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        missing = [p.grad is None for p in group]
        present = torch.tensor([not m for m in missing], dtype=group[0].dtype).to(group[0].device, non_blocking=True)
        flat = _flatten_dense_tensors([*grads, present])
        dist.all_reduce(flat)
        *summed, present = _unflatten_dense_tensors(flat, [*grads, present])
        counts = present.tolist() if any(missing) else [world_size] * len(group)
        for parameter, total, count in zip(group, summed, counts):
            parameter.grad = total.div_(world_size) if count > 0 else None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def gather_objects(value) -> list:
    """Every replica's ``value`` (picklable), in rank order, on every replica."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    dist.barrier()
