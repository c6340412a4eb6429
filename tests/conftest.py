"""Test set-up shared by every test module.

Triton has no CPU backend: without a CUDA device its kernels are tested through the interpreter,
which must be switched on before triton is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
