"""Triton kernels, installed as ``aelearn.kernels`` (GPU; on the CPU only under TRITON_INTERPRET=1)."""
