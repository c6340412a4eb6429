"""The platform: build, registry and dispatch, the pure-Python fallback, memory linearity."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import aelearn
from aelearn import _ext
from aelearn.cli import info_text, main
from aelearn.ops import _registry, mmd
from aelearn.ops._registry import BackendUnavailableError

X = torch.randn(6, 3)
Y = torch.randn(5, 3)
EXTENSION_DISABLED = os.environ.get("AELEARN_NO_EXT", "") not in ("", "0")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_the_backends_this_machine_should_run_are_available():
    """Guards the harness against skipping into green: what can run here must not be skipped."""
    assert set(aelearn.backends()) == {"hsic", "log_qz", "mmd", "pixelcnn_step", "vq_nearest"}
    for op, table in aelearn.backends().items():
        assert set(table) == set(_registry.BACKEND_NAMES), op
        assert table["reference"] is None
        assert table["numba"] is None, (op, table["numba"])
        if not EXTENSION_DISABLED:
            assert table["cpp"] is None, (op, table["cpp"])
        if importlib.util.find_spec("triton") is not None:
            assert table["triton"] is None, (op, table["triton"])
        if torch.cuda.is_available() and not EXTENSION_DISABLED:
            assert table["cuda"] is None, (op, table["cuda"])


@pytest.mark.skipif(EXTENSION_DISABLED, reason="AELEARN_NO_EXT is set: the extension is off on purpose")
def test_extension_build_info_and_cuda_sources_compiled():
    info = _ext.build_info()
    assert info["extension"] and info["torch_version"] == torch.__version__
    assert info["openmp"]
    assert "-O3" in info["cxx_flags"]
    nvcc_present = subprocess.run(["which", "nvcc"], capture_output=True).returncode == 0
    # Where nvcc exists the CUDA sources are compiled (linked only where torch has CUDA).
    assert info["cuda_compiled"] == nvcc_present
    assert info["cuda_linked"] == (nvcc_present and torch.version.cuda is not None)


@pytest.mark.skipif(EXTENSION_DISABLED, reason="AELEARN_NO_EXT is set: the extension is off on purpose")
def test_library_ops_pass_opcheck():
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.aelearn.mmd_sums.default, (x, y, "rbf", [0.5, 0.1], True))
    torch.library.opcheck(torch.ops.aelearn.mmd_grads.default, (x, y, "imq", [1.0], False, 0.1, 0.2, -0.3))
    y = torch.randn(7, 2, dtype=torch.float64)
    sums = torch.ops.aelearn.hsic_sums(x, y, "rbf", [0.5], "linear", [], True)
    torch.library.opcheck(torch.ops.aelearn.hsic_sums.default, (x, y, "rbf", [0.5], "linear", [], True))
    torch.library.opcheck(torch.ops.aelearn.hsic_grads.default, (x, y, "imq", [1.0], "rbf", [0.3], False, sums[1], sums[2], 0.1, -0.2, 0.3))
    z, mu, logvar = torch.randn(3, 6, 4, dtype=torch.float64).unbind()
    groups = torch.tensor([0, 1, 1, 0])
    joint, marginals = torch.ops.aelearn.log_qz_forward(z, mu, logvar, groups, 2, -2.0, -1.0, -3.0)
    torch.library.opcheck(torch.ops.aelearn.log_qz_forward.default, (z, mu, logvar, groups, 2, -2.0, -1.0, -3.0))
    torch.library.opcheck(
        torch.ops.aelearn.log_qz_backward.default,
        (z, mu, logvar, groups, 2, -2.0, -1.0, -3.0, joint, marginals, torch.ones_like(joint), torch.ones_like(marginals)),
    )
    torch.library.opcheck(torch.ops.aelearn.vq_nearest.default, (torch.randn(9, 4), torch.randn(5, 4)))
    layers, n, width, features, channels = 2, 3, 5, 4, 6
    step_inputs = (torch.randn(n, width, features), torch.randn(layers, n, width, channels), torch.randn(layers, n, width, 2 * channels), 2,
                   torch.randn(2, features, 2 * channels), torch.randn(layers - 1, 2, channels, 2 * channels),
                   torch.randn(layers, channels, channels), torch.randn(layers, channels), torch.randn(layers, channels, 7),
                   torch.randn(7), torch.randn(7, 3), torch.randn(3), torch.randn(3, 2), torch.randn(2))
    torch.library.opcheck(torch.ops.aelearn.pixelcnn_step.default, step_inputs)


def test_selection_order_argument_context_environment_priority(monkeypatch):
    automatic = _registry.select("mmd", X.device, X.dtype, X, Y, "rbf", (0.5,))
    assert automatic.name == ("numba" if EXTENSION_DISABLED else "cpp")
    monkeypatch.setenv("AELEARN_BACKEND", "reference")
    assert _registry.select("mmd", X.device, X.dtype, X, Y, "rbf", (0.5,)).name == "reference"
    with aelearn.use_backend("numba"):
        assert _registry.select("mmd", X.device, X.dtype, X, Y, "rbf", (0.5,)).name == "numba"
        assert _registry.select("mmd", X.device, X.dtype, X, Y, "rbf", (0.5,), backend="reference").name == "reference"
        with aelearn.use_backend(None):
            assert _registry.select("mmd", X.device, X.dtype, X, Y, "rbf", (0.5,)).name == "reference"
    monkeypatch.setenv("AELEARN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="AELEARN_BACKEND must be one of"):
        mmd(X, Y)


def test_explicit_request_that_cannot_run_raises_with_every_reason():
    with pytest.raises(BackendUnavailableError, match="'cuda' .*cannot run this call"):
        mmd(X, Y, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="supports float32, float64, not float16"):
        mmd(X.half(), Y.half(), backend="numba")
    with aelearn.use_backend("numba"), pytest.raises(BackendUnavailableError, match=r"from use_backend\(\)"):
        mmd(X.half(), Y.half())


def test_automatic_selection_falls_back_and_explain_says_why():
    # float16 is supported by the reference only: automatic selection falls back to it.
    value = mmd(X.half(), Y.half(), bandwidths=1.0)
    assert value.dtype == torch.float16
    reasons = _registry.explain("mmd", X.device, torch.float16, X, Y, "rbf", (0.5,))
    assert reasons["reference"] == []
    assert any("float16" in r for r in reasons["numba"])


def test_input_limits_are_reasons_of_their_backends():
    many = tuple(0.1 * (k + 1) for k in range(65))
    cuda_reasons = _registry.impls("mmd")["cuda"].input_reasons(X, Y, "rbf", many)
    assert cuda_reasons == ["the cuda kernels take at most 64 bandwidths per kernel, got 65"]
    assert _registry.impls("hsic")["cuda"].input_reasons(X, Y, "rbf", (1.0,), "imq", many) == cuda_reasons
    assert _registry.impls("log_qz")["cpp"].input_reasons(X, X, X, torch.arange(3), 3) == []
    assert _registry.impls("mmd")["cpp"].input_reasons(X, Y, "rbf", many) == []


def test_register_rejects_duplicates_and_unknown_names():
    impl = _registry.impls("mmd")["reference"]
    with pytest.raises(ValueError, match="already has a backend"):
        _registry.register(impl)
    with pytest.raises(ValueError, match="backend name must be one of"):
        _registry.register(_registry.Impl(**{**impl.__dict__, "name": "opencl"}))
    with pytest.raises(KeyError, match="no op named"):
        _registry.impls("fft")


def test_info_command_lists_backends_with_reasons(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert printed == info_text() + "\n"
    assert f"torch {torch.__version__}" in printed
    for op in _registry.ops():
        for name in _registry.BACKEND_NAMES:
            assert re.search(rf"^\s*{op}\s+{name}\b", printed, re.MULTILINE), (op, name)
    completed = run_python("import runpy; runpy.run_module('aelearn', run_name='__main__')")
    assert completed.returncode == 2 and "info" in completed.stderr


def test_pure_python_fallback_warns_once_and_uses_numba():
    completed = run_python(
        """
        import warnings
        warnings.simplefilter("always")
        import torch, aelearn
        from aelearn.ops import mmd, _registry
        x, y = torch.randn(9, 2), torch.randn(7, 2)
        assert aelearn.backends()["mmd"]["cpp"].endswith("disabled by AELEARN_NO_EXT=1")
        assert _registry.select("mmd", x.device, x.dtype, x, y, "rbf", (0.5,)).name == "numba"
        a = mmd(x, y, bandwidths=1.0)
        b = mmd(x, y, bandwidths=1.0, backend="reference")
        assert abs(float(a) - float(b)) < 1e-6
        mmd(x, y, bandwidths=1.0)
        """,
        AELEARN_NO_EXT="1",
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.count("running without its compiled extension") == 1, completed.stderr


# One fused forward + backward per op at a size where a single n×n (B×B) float32 matrix would
# be several times the allowed peak: (op, code of one step at size n, n, the allowed peak in MiB).
MEMORY_CASES = {
    # n×m float32 at 12,000: 549 MiB.
    "mmd": ("mmd(torch.randn(n, 8, requires_grad=True), torch.randn(n, 8, requires_grad=True), bandwidths=[1.0, 2.0], backend=BACKEND).backward()", 12_000, 128),
    # n×n float32 at 12,000: 549 MiB.
    "hsic": ("hsic(torch.randn(n, 8, requires_grad=True), torch.randn(n, 8, requires_grad=True), bandwidth_x=1.0, bandwidth_y=2.0, backend=BACKEND).backward()", 12_000, 128),
    # B×B float32 at 8,192: 256 MiB; B×B×D: 4 GiB.
    "log_qz": ("total_correlation(*torch.randn(3, n, 16, requires_grad=True), dataset_size=10 * n, estimator='mss', backend=BACKEND).backward()", 8_192, 64),
    # N×K float32 at 100,000 × 8192: 3 GiB; z, its gradient and the backward's temporaries: 6 MiB each.
    "vq_nearest": ("vq_nearest(torch.randn(n, 16, requires_grad=True), torch.randn(8192, 16), backend=BACKEND)[1].sum().backward()", 100_000, 64),
}


@pytest.mark.parametrize("backend", ["cpp", "numba"])
@pytest.mark.parametrize("op", sorted(MEMORY_CASES))
def test_forward_and_backward_stay_memory_linear(op, backend):
    """Peak extra memory (RSS high-water mark above the level before the call) of a large step."""
    if aelearn.backends()[op][backend] is not None:
        pytest.skip(f"{backend}: {aelearn.backends()[op][backend]}")
    step, n, limit_mib = MEMORY_CASES[op]
    completed = run_python(
        f"""
        import torch
        from aelearn.ops import hsic, mmd, total_correlation, vq_nearest
        from peak_memory import peak_extra_bytes

        BACKEND = "{backend}"

        def step(n):
            {step}

        step(64)  # compile and warm up first
        extra = peak_extra_bytes(lambda: step({n}))
        print(extra)
        assert extra < {limit_mib} * 2**20, extra
        """,
        PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "benchmarks"),
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_finite_check_reads_every_slab_of_rows(monkeypatch):
    from aelearn.ops import _kernels

    monkeypatch.setattr(_kernels, "FINITE_CHECK_ELEMENTS", 6)
    _kernels.check_finite("z", torch.empty(0, 4))
    _kernels.check_finite("z", torch.randn(11, 4).T)
    for row in (0, 5, 10):
        z = torch.randn(11, 4)
        z[row, 3] = float("nan") if row != 5 else float("-inf")
        with pytest.raises(ValueError, match="z contains NaN or Inf"):
            _kernels.check_finite("z", z)
    # Finite values whose sum overflows, and infinities that cancel to NaN in a sum.
    _kernels.check_finite("z", torch.full((11, 4), 3e38))
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        _kernels.check_finite("z", torch.tensor([[math.inf], [-math.inf]]))
