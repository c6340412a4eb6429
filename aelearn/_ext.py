"""Loading of the compiled extension ``aelearn._C`` (C++ CPU kernels, CUDA kernels where built).

The extension is optional: without it aelearn runs through numba and the reference. Why it is
missing is said once, with a warning, the first time it is looked for.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch


class ExtensionNotBuiltWarning(UserWarning):
    """aelearn runs without its compiled extension (numba and reference backends only)."""


@functools.cache
def _load() -> tuple[object | None, str | None]:
    if os.environ.get("AELEARN_NO_EXT", "") not in ("", "0"):
        return None, "disabled by AELEARN_NO_EXT=1"
    try:
        module = importlib.import_module("aelearn._C")
    except ImportError as error:
        return None, (
            f"aelearn._C could not be imported ({error}); it is built by `pip install "
            "--no-build-isolation .` when a C++ compiler and CMake are present and AELEARN_NO_EXT is unset"
        )
    built_for = module.build_info()["torch_version"]
    if built_for != torch.__version__:
        return None, f"aelearn._C was built for torch {built_for} but torch {torch.__version__} is installed; reinstall aelearn"
    return module, None


def extension():
    """The loaded ``aelearn._C`` module, or None (see :func:`missing_reason`)."""
    module, reason = _load()
    if module is None:
        _warn_once(reason)
    return module


def missing_reason() -> str | None:
    """Why the extension is not in use, or None when it is."""
    return _load()[1]


def build_info() -> dict:
    """How the extension was built (compiler flags, OpenMP, CUDA), or why there is none."""
    module = extension()
    if module is None:
        return {"extension": False, "reason": missing_reason()}
    return {"extension": True, **module.build_info()}


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"aelearn is running without its compiled extension: {reason}. "
        "The cpp and cuda backends are unavailable; numba and the reference are used instead.",
        ExtensionNotBuiltWarning,
        stacklevel=3,
    )
