"""The compiled CUDA extension abft_kernels._C (csrc/, built by setup.py): loaded once at import, or
the reason it is missing. Backend "cuda" needs it; every other backend works without it."""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads the torch libraries that the extension links against)


def _load():
    try:
        module = importlib.import_module("abft_kernels._C")
    except ModuleNotFoundError as exc:
        if exc.name != "abft_kernels._C":
            raise
        return None, ("abft_kernels._C is not built (on a machine with CUDA and nvcc: "
                      "pip install --no-build-isolation -e . ; see docs/kernels.md, 'CUDA extension')")
    except ImportError as exc:  # built, but against another torch or CUDA runtime
        return None, f"abft_kernels._C is built but does not load: {exc}"
    return module, (f"abft_kernels._C is loaded (head dims {tuple(module.SUPPORTED_HEAD_DIMS)}, "
                    f"up to {module.MAX_NUM_CLASSES} classes)")


extension, _status = _load()


def cuda_extension_available() -> bool:
    """Whether the compiled CUDA extension (backend "cuda") is present."""
    return extension is not None


def cuda_extension_status() -> str:
    """One line: the extension is loaded, or why it is not."""
    return _status
