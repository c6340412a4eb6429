"""numba kernels: the CPU fallback when the compiled extension is not built."""
