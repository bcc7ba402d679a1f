"""label_attention: attention output plus the attention mass on each label class, by backend."""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from ._validation import validate_label_attention_args

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
_BACKEND_MODULES = {
    "reference": "abft_kernels.ops.reference",
    "torch": "abft_kernels.ops.torch_backend",
    "triton": "abft_kernels.ops.triton_label_attention",
    "cuda": "abft_kernels.ops.cuda_backend",
}


@lru_cache(maxsize=None)
def backend_available(name: str) -> bool:
    """Whether backend `name` can be imported here (it may still need CUDA tensors to run)."""
    try:
        _backend_module(name)
    except ImportError:
        return False
    return True


def _backend_module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend that `backend` stands for on q's device."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype != torch.float64 and backend_available("triton"):  # the kernel has no fp64 path
        return "triton"
    return "torch"


def label_attention(q, k, v, key_class, num_classes, query_rows=None, causal=True, scale=None,
                    key_padding_mask=None, backend="auto", _check_values: bool = True):
    """Attention output and per-label-class attention mass, without forming the N x N scores.

    q [B,Hq,N,D]; k, v [B,Hkv,N,D] (Hq a multiple of Hkv); key_class int [B,N] (-1 = not a label,
    else 0..num_classes-1); query_rows int [B,R] (-1 = empty slot, mass 0) or None for every row;
    key_padding_mask bool [B,N], True = real token. Returns out [B,Hq,N,D] in q.dtype and
    mass float32 [B,Hq,R,C]: mass[b,h,r,c] = sum of the softmax row query_rows[b,r] over keys of class c.

    _check_values (private): False skips the range checks of key_class and query_rows (a host sync), for
    abft_kernels.hf, which checks a LabelSpec's values once per model call instead of once per layer.
    """
    name = resolve_backend(backend, q) if isinstance(q, torch.Tensor) else "torch"
    try:
        module = _backend_module(name)
    except ImportError as exc:
        raise ValueError(f"backend={name!r} is not available here: {exc}") from exc
    args = validate_label_attention_args(q, k, v, key_class, num_classes, query_rows, causal, scale,
                                         key_padding_mask, max_num_classes=module.MAX_NUM_CLASSES,
                                         check_values=_check_values)
    return module.label_attention(args)
