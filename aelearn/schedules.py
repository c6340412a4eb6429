"""Schedules: a number as a function of the training step, for loss weights and the learning rate.

Loss weights that change during training are part of most families of the review: KL annealing
and warm-up (Bowman et al. 2016, Sønderby et al. 2016: β rises from 0 to 1), cyclical annealing
(Fu et al. 2019), the growing capacity C of Burgess et al. 2018, and learning-rate decay. A
schedule is a pure function of the step (the number of optimiser steps taken before the current
one), so a resumed run needs no schedule state to continue exactly.

Configuration files give a schedule as a *spec* (:func:`build_schedule`): a number (constant), a
kind's name (its defaults: decay from 1 to 0 over ``default_steps``, the usual learning-rate
schedule), or a table ``{kind = "linear", start = 0.0, end = 1.0, steps = 10000}``.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")
    return value


class Schedule:
    """``schedule(step) -> float``."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class Linear(Schedule):
    """``start`` until step ``begin``, then a straight line to ``end`` at ``begin + steps``, then ``end``."""

    start: float
    end: float
    steps: int
    begin: int = 0

    def progress(self, step: int) -> float:
        """How far along the ramp ``step`` is, from 0 to 1."""
        return min(max((step - self.begin) / self.steps, 0.0), 1.0)

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * self.progress(step)


@dataclass(frozen=True)
class Cosine(Linear):
    """As :class:`Linear` along half a cosine: flat at both ends (Loshchilov & Hutter 2017)."""

    def __call__(self, step: int) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))


@dataclass(frozen=True)
class Cyclical(Schedule):
    """Cyclical annealing (Fu et al. 2019): each ``period`` steps, a line from ``start`` to ``end``
    over the first ``ratio`` of the period, then ``end``; after ``cycles`` periods (0: never) ``end``."""

    start: float
    end: float
    period: int
    ratio: float = 0.5
    cycles: int = 0

    def __call__(self, step: int) -> float:
        if self.cycles and step >= self.cycles * self.period:
            return self.end
        progress = min((step % self.period) / (self.ratio * self.period), 1.0)
        return self.start + (self.end - self.start) * progress


@dataclass(frozen=True)
class Piecewise(Schedule):
    """``values[i]`` from step ``boundaries[i - 1]`` (0 for i = 0) until ``boundaries[i]``: a staircase."""

    values: tuple[float, ...]
    boundaries: tuple[int, ...]

    def __call__(self, step: int) -> float:
        index = sum(1 for boundary in self.boundaries if step >= boundary)
        return self.values[index]


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "cyclical": Cyclical,
    "piecewise": Piecewise,
}


def _checked(kind: str, params: dict, name: str) -> Schedule:
    """The schedule of ``kind`` from ``params``, every parameter checked by name."""
    cls = SCHEDULES[kind]
    valid = [f.name for f in fields(cls)]
    required = [f.name for f in fields(cls) if f.default is MISSING]
    for key in params:
        if key not in valid:
            raise ValueError(f"{name}: unknown parameter {key!r} of a {kind!r} schedule; valid parameters: {', '.join(valid)}")
    missing = [key for key in required if key not in params]
    if missing:
        raise ValueError(f"{name}: a {kind!r} schedule needs {', '.join(missing)}")
    if cls is Piecewise:
        values, boundaries = params["values"], params["boundaries"]
        if not isinstance(values, (list, tuple)) or not isinstance(boundaries, (list, tuple)):
            raise ValueError(f"{name}: values and boundaries of a piecewise schedule must be lists")
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"{name}: a piecewise schedule needs one value more than boundaries, got {len(values)} and {len(boundaries)}")
        checked_boundaries = tuple(_count(f"{name}.boundaries", b, minimum=0) for b in boundaries)
        if list(checked_boundaries) != sorted(checked_boundaries):
            raise ValueError(f"{name}: boundaries must be increasing, got {list(boundaries)}")
        return Piecewise(tuple(_number(f"{name}.values", v) for v in values), checked_boundaries)
    checked = {}
    for key, value in params.items():
        if key in ("steps", "period"):
            checked[key] = _count(f"{name}.{key}", value, minimum=1)
        elif key in ("begin", "cycles"):
            checked[key] = _count(f"{name}.{key}", value, minimum=0)
        else:
            checked[key] = _number(f"{name}.{key}", value)
    if cls is Cyclical and not 0.0 < checked.get("ratio", 0.5) <= 1.0:
        raise ValueError(f"{name}.ratio must be in (0, 1], got {checked['ratio']!r}")
    return cls(**checked)


def build_schedule(spec, *, name: str = "schedule", default_steps: int | None = None) -> Schedule:
    """The schedule a spec describes.

    ``spec``: a :class:`Schedule` (returned as it is); a number (:class:`Constant`); a kind's name
    from :data:`SCHEDULES` ("constant" is 1.0, "linear" and "cosine" go from 1 to 0 over
    ``default_steps``); or a dict ``{"kind": ..., **parameters}`` in which ``steps`` defaults to
    ``default_steps`` when that is given. ``name`` names the setting in error messages.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(_number(name, spec))
    if isinstance(spec, str):
        if spec == "constant":
            return Constant(1.0)
        spec = {"kind": spec, "start": 1.0, "end": 0.0}
    if not isinstance(spec, dict):
        raise ValueError(f"{name} must be a number, a schedule's name or a table with a 'kind', got {spec!r}")
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind not in SCHEDULES:
        raise ValueError(f"{name}: unknown schedule kind {kind!r}; valid kinds: {', '.join(SCHEDULES)}")
    if kind in ("linear", "cosine") and "steps" not in params and default_steps is not None:
        params["steps"] = default_steps
    return _checked(kind, params, name)
