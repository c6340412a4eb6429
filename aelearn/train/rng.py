"""Seeds and random-number-generator states: what makes a run repeatable and a resume exact.

Every random stream of a run is seeded by :func:`derive_seed` from the configured seed and a tag
naming its use, so streams are independent of each other and of the number of steps taken by the
others. The global streams (torch CPU and CUDA, NumPy, Python's ``random``) are captured into a
checkpoint as tensors and primitives only, so that it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def derive_seed(seed: int, tag: str, *numbers: int) -> int:
    """A 63-bit seed for the stream ``tag`` (and ``numbers``, e.g. the rank or the epoch) of a run."""
    entropy = [seed, zlib.crc32(tag.encode()), *numbers]
    low, high = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(high) << 31 ^ int(low)


def seed_everything(seed: int) -> None:
    """Seed torch (every device), NumPy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng_state() -> dict:
    """This process's global generator states as tensors and primitives."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    """Set the global generators to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
