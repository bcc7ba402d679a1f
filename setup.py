"""Build script. Metadata lives in pyproject.toml; this file only adds the optional CUDA extension
abft_kernels._C (csrc/), which needs torch importable at build time:

    pip install --no-build-isolation -e .     # on a machine with a CUDA build of torch and nvcc

ABFT_BUILD_CUDA=1 builds it even without a visible GPU, ABFT_BUILD_CUDA=0 never builds it.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default below), MAX_JOBS the parallel compiles.
A skipped or failed build never fails the install: the Python / Triton package works without it.
"""
import os
import sys

from setuptools import setup

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # A100 (and sm_86/89 cards), H100; PTX for newer GPUs
SOURCES = ["csrc/torch_binding.cpp", "csrc/row_mass_forward.cu", "csrc/row_mass_backward.cu"]


def _note(message):
    print(f"abft-kernels: {message}", file=sys.stderr)


def cuda_extension_options():
    """setup() keywords that add abft_kernels._C, or {} (with the reason printed) to skip it."""
    mode = os.environ.get("ABFT_BUILD_CUDA", "auto")
    if mode == "0":
        _note("ABFT_BUILD_CUDA=0: not building the CUDA extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except (ImportError, OSError) as exc:
        _note(f"not building the CUDA extension: torch is not importable at build time ({exc}); "
              "use pip install --no-build-isolation")
        return {}
    if torch.version.cuda is None:
        _note(f"not building the CUDA extension: torch {torch.__version__} is a CPU-only build")
        return {}
    if CUDA_HOME is None:
        _note("not building the CUDA extension: nvcc not found (set CUDA_HOME)")
        return {}
    if mode != "1" and not torch.cuda.is_available():
        _note("not building the CUDA extension: no GPU visible (ABFT_BUILD_CUDA=1 builds it anyway)")
        return {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)

    class OptionalBuildExtension(BuildExtension):
        """A failed compile is reported and leaves the package without abft_kernels._C."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler or linker failure
                self.extensions = []
                _note(f"building the CUDA extension failed, installing without it: {exc}")

    extension = CUDAExtension(
        name="abft_kernels._C",
        sources=SOURCES,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**cuda_extension_options())
