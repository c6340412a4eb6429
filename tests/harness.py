"""The shared harness: every registered backend of an op, on every device it can use here.

``backend_params(op)`` yields one pytest parameter per (backend, device); a backend that cannot
run on this machine is skipped with its reason (tests in ``test_platform.py`` make sure the
backends this machine *should* run are not among them). Adding a backend to the registry adds it
to every parametrised test with no new test code.
"""

from __future__ import annotations

import pytest
import torch

from aelearn.ops import _registry

# The Triton interpreter runs kernels in numpy, one program instance at a time: it gets the
# small cases only.
INTERPRETED_MAX_SAMPLES = 80


def devices_here() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params(op: str) -> list:
    params = []
    for name, impl in _registry.impls(op).items():
        for device in impl.devices:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            reason = impl.availability()
            if reason is None and device not in devices_here():
                reason = f"no {device} device on this machine"
            if reason is not None:
                marks.append(pytest.mark.skip(reason=f"{name} on {device}: {reason}"))
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def interpreted(backend: str, device: str) -> bool:
    """Whether this backend runs through the (slow) Triton interpreter here."""
    return backend == "triton" and device == "cpu"


def tolerance(op: str, backend: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) that ``backend`` promises for ``dtype`` against a float64 evaluation."""
    return _registry.impls(op)[backend].tolerances[dtype]
