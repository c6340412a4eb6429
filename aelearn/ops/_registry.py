"""Backend registry: every op registers one :class:`Impl` per backend; :func:`select` picks one per call.

Selection order for a call (DESIGN.md): the call's ``backend=`` argument, then the innermost
:func:`use_backend` context, then the ``AELEARN_BACKEND`` environment variable, then the per-device
priority (:data:`DEVICE_PRIORITY`). A backend requested by any of the first three must be able to run
the call, or :class:`BackendUnavailableError` lists every reason it cannot; only the automatic choice
falls back to the next backend in the priority list.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

# Automatic choice per device type, best first. Triton on the CPU (its interpreter) is for testing
# only, so it is never picked automatically there.
DEVICE_PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "numba", "reference"),
}

BACKEND_NAMES = ("reference", "cpp", "numba", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call; the message lists every reason."""


@dataclass(frozen=True)
class Impl:
    """One backend of one op.

    ``forward`` and ``backward`` have the op's own signature (see the op module); ``backward`` is
    None where the op's wrapper differentiates the forward itself (by autograd through the reference,
    or in plain torch for forward-only ops such as ``vq_nearest``). ``availability``
    returns ``None`` when the backend can run at all on this installation, else the reason it
    cannot. ``input_reasons(*inputs)`` lists why it cannot run these particular inputs (beyond
    device and dtype, which are checked here from ``devices`` and ``dtypes``). ``tolerances`` maps
    a dtype to the (atol, rtol) its results keep against a float64 evaluation of the reference.
    """

    op: str
    name: str
    forward: Callable
    backward: Callable | None
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    availability: Callable[[], str | None]
    input_reasons: Callable[..., list[str]] = field(default=lambda *inputs: [])
    tolerances: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)

    def reasons(self, device: torch.device, dtype: torch.dtype, *inputs) -> list[str]:
        """Every reason this backend cannot run the given inputs; empty when it can."""
        unavailable = self.availability()
        if unavailable is not None:
            return [unavailable]
        reasons = []
        if device.type not in self.devices:
            reasons.append(f"runs on {', '.join(self.devices)}, not {device.type}")
        if dtype not in self.dtypes:
            names = ", ".join(str(t).removeprefix("torch.") for t in self.dtypes)
            reasons.append(f"supports {names}, not {str(dtype).removeprefix('torch.')}")
        if not reasons:
            reasons.extend(self.input_reasons(*inputs))
        return reasons


_IMPLS: dict[str, dict[str, Impl]] = {}
_CONTEXT_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aelearn_backend", default=None
)


def register(impl: Impl) -> Impl:
    """Add ``impl`` to the registry of its op (one per op and backend name)."""
    if impl.name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {impl.name!r}")
    impls = _IMPLS.setdefault(impl.op, {})
    if impl.name in impls:
        raise ValueError(f"op {impl.op!r} already has a backend {impl.name!r}")
    impls[impl.name] = impl
    return impl


def impls(op: str) -> dict[str, Impl]:
    """All registered backends of ``op``, by name."""
    if op not in _IMPLS:
        raise KeyError(f"no op named {op!r}; registered ops: {sorted(_IMPLS)}")
    return dict(_IMPLS[op])


def ops() -> list[str]:
    """Names of all ops with at least one backend."""
    return sorted(_IMPLS)


def _check_name(name: str, origin: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{origin} must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, every op call without ``backend=`` uses backend ``name``.

    ``use_backend(None)`` restores automatic selection inside an outer context.
    """
    if name is not None:
        _check_name(name, "use_backend(name)")
    token = _CONTEXT_BACKEND.set(name)
    try:
        yield
    finally:
        _CONTEXT_BACKEND.reset(token)


def requested_backend(backend: str | None) -> tuple[str | None, str]:
    """The backend asked for by argument, context or environment, and where the request came from."""
    if backend is not None:
        return _check_name(backend, "backend"), "backend="
    if _CONTEXT_BACKEND.get() is not None:
        return _CONTEXT_BACKEND.get(), "use_backend()"
    env = os.environ.get("AELEARN_BACKEND", "").strip()
    if env:
        return _check_name(env, "environment variable AELEARN_BACKEND"), "AELEARN_BACKEND"
    return None, "automatic"


def select(op: str, device: torch.device, dtype: torch.dtype, *inputs, backend: str | None = None) -> Impl:
    """The backend that runs this call of ``op`` (see the module docstring for the order)."""
    candidates = impls(op)
    name, origin = requested_backend(backend)
    if name is not None:
        if name not in candidates:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} (from {origin}) is not registered for this op; "
                f"registered: {', '.join(sorted(candidates))}"
            )
        reasons = candidates[name].reasons(device, dtype, *inputs)
        if reasons:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} (from {origin}) cannot run this call: " + "; ".join(reasons)
            )
        return candidates[name]
    rejected = []
    for candidate in DEVICE_PRIORITY.get(device.type, ("reference",)):
        if candidate not in candidates:
            continue
        reasons = candidates[candidate].reasons(device, dtype, *inputs)
        if not reasons:
            return candidates[candidate]
        rejected.append(f"{candidate}: {'; '.join(reasons)}")
    raise BackendUnavailableError(f"{op}: no backend can run this call ({' | '.join(rejected)})")


def explain(op: str, device: torch.device, dtype: torch.dtype, *inputs) -> dict[str, list[str]]:
    """For each backend of ``op``, why it cannot run these inputs (an empty list: it can)."""
    return {name: impl.reasons(device, dtype, *inputs) for name, impl in impls(op).items()}


def backends() -> dict[str, dict[str, str | None]]:
    """What can run on this installation: ``{op: {backend: None if available else reason}}``."""
    return {op: {name: impl.availability() for name, impl in _IMPLS[op].items()} for op in ops()}


def available(op: str, device_type: str | None = None) -> list[str]:
    """Names of the backends of ``op`` that are installed and usable (on ``device_type`` if given)."""
    return [
        name
        for name, impl in impls(op).items()
        if impl.availability() is None and (device_type is None or device_type in impl.devices)
    ]

