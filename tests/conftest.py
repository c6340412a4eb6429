"""Test set-up shared by every test module.

Triton has no CPU backend: without a CUDA device its kernels are tested through the interpreter,
which must be switched on before triton is first imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two on a shared machine, and give the same result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
