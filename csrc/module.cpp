// The Python module aelearn._C. Tensors never pass through pybind11: the ops are registered with
// the dispatcher (TORCH_LIBRARY in <op>.cpp, cpu/, cuda/) and called as torch.ops.aelearn.*.
// This module only says how the extension was built.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "aelearn compiled kernels (registered as torch.ops.aelearn.*) and their build information";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = AELEARN_TORCH_VERSION;
    info["compiler"] = AELEARN_COMPILER;
    info["cxx_flags"] = AELEARN_CXX_FLAGS;
#ifdef _OPENMP
    info["openmp"] = true;
    info["openmp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
#endif
    info["cuda_compiled"] = static_cast<bool>(AELEARN_CUDA_COMPILED);
    info["cuda_linked"] = static_cast<bool>(AELEARN_CUDA_LINKED);
    info["cuda_architectures"] = AELEARN_CUDA_ARCHITECTURES;
    return info;
  });
}
