"""Build of aelearn: pure-Python packages plus the extension aelearn._C, built by CMake.

The cmake_example pattern (pybind11): setup.py hands CMake the paths of torch and pybind11 and
the output directory. Build against the torch already installed: ``pip install --no-build-isolation .``

Environment:
    AELEARN_NO_EXT=1        install pure Python (numba and reference backends only)
    AELEARN_REQUIRE_EXT=1   fail the install when the extension cannot be built (used by CI)
    AELEARN_CUDA_ARCHS      CUDA architectures to compile for (default "90")
    AELEARN_NATIVE_ARCH=0   compile the CPU kernels without -march=native (portable binaries)
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            self._cmake(ext)
        except (OSError, subprocess.CalledProcessError, ImportError) as error:
            if _flag("AELEARN_REQUIRE_EXT"):
                raise
            print(
                f"\n*** aelearn: the compiled extension could not be built ({error}).\n"
                "*** Installing pure Python: the numba and reference backends will be used.\n",
                file=sys.stderr,
            )

    def _cmake(self, ext: Extension) -> None:
        import pybind11
        import torch
        import torch.utils

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DAELEARN_TORCH_VERSION={torch.__version__}",
            f"-DAELEARN_TORCH_CUDA={'ON' if torch.version.cuda else 'OFF'}",
            f"-DAELEARN_CUDA_ARCHITECTURES={os.environ.get('AELEARN_CUDA_ARCHS', '90')}",
            f"-DAELEARN_NATIVE_ARCH={'OFF' if os.environ.get('AELEARN_NATIVE_ARCH') == '0' else 'ON'}",
            f"-DAELEARN_WITH_CUDA={'OFF' if os.environ.get('AELEARN_WITH_CUDA') == '0' else 'ON'}",
        ]
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True, env=env)
        subprocess.run(["cmake", "--build", "."], cwd=build_temp, check=True, env=env)


setup(
    packages=["aelearn", "aelearn.ops", "aelearn._numba", "aelearn.data", "aelearn.layers", "aelearn.losses", "aelearn.models", "aelearn.stats", "aelearn.train", "aelearn.metrics", "aelearn.kernels"],
    package_dir={"aelearn.kernels": "kernels"},
    ext_modules=[] if _flag("AELEARN_NO_EXT") else [CMakeExtension("aelearn._C")],
    cmdclass={"build_ext": CMakeBuild},
)
