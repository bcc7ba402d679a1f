"""Input checking for label_attention: every bad argument raises ValueError naming it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LabelAttentionArgs:
    """Checked, normalised arguments shared by every backend.

    key_class and query_rows are int64; query_rows is None when every row carries a mass; sinks is None or the
    caller's [Hq] float tensor (any float dtype, backends compute with it in fp32 or fp64).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_class: torch.Tensor
    num_classes: int
    query_rows: Optional[torch.Tensor]
    causal: bool
    scale: float
    key_padding_mask: Optional[torch.Tensor]
    sinks: Optional[torch.Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.q.shape[2] if self.query_rows is None else self.query_rows.shape[1]


def _check_tensor(name: str, t, ndim: int, shape_hint: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint} ({ndim} dims), got {tuple(t.shape)}")
    return t


def check_integer(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def index_value_flags(key_class: torch.Tensor, num_classes: int, query_rows: Optional[torch.Tensor],
                      seq_len: int) -> List[torch.Tensor]:
    """Bool scalars on the tensors' device, True where a value is out of range: [key_class] or [key_class,
    query_rows]. Stack them with other flags to read everything in one host sync."""
    flags = [((key_class < -1) | (key_class >= num_classes)).any()]
    if query_rows is not None:
        flags.append(((query_rows < -1) | (query_rows >= seq_len)).any())
    return flags


def raise_for_index_values(flags: Sequence[bool], key_class: torch.Tensor, num_classes: int,
                           query_rows: Optional[torch.Tensor], seq_len: int) -> None:
    """ValueError for the first True flag of index_value_flags (read on the host)."""
    if flags[0]:
        lo, hi = int(key_class.min()), int(key_class.max())
        raise ValueError(
            f"key_class values must be -1 (not a label) or in [0, num_classes={num_classes}), got range [{lo}, {hi}]")
    if query_rows is not None and flags[1]:
        lo, hi = int(query_rows.min()), int(query_rows.max())
        raise ValueError(f"query_rows values must be -1 (empty slot) or in [0, N={seq_len}), got range [{lo}, {hi}]")


def validate_label_attention_args(
    q, k, v, key_class, num_classes, query_rows, causal, scale, key_padding_mask, sinks=None,
    check_values: bool = True,
) -> LabelAttentionArgs:
    """Check label_attention's arguments (see its docstring) and normalise them.

    check_values=False skips the checks that read tensor contents (class ids and rows in range, sinks finite: one
    host sync), for callers that ran index_value_flags/raise_for_index_values already (abft_kernels.hf checks a
    LabelSpec once per model call instead of once per layer).

    Raises:
        ValueError: naming the first argument that is wrong and what was expected.
    """
    q = _check_tensor("q", q, 4, "[B, Hq, N, D]")
    k = _check_tensor("k", k, 4, "[B, Hkv, N, D]")
    v = _check_tensor("v", v, 4, "[B, Hkv, N, Dv]")
    batch, num_q_heads, seq_len, head_dim = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same B, Hkv and N (v may have its own head dim Dv), got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        raise ValueError(
            f"k must have shape [B={batch}, Hkv, N={seq_len}, D={head_dim}] to match q, got {tuple(k.shape)}")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"k has {num_kv_heads} heads, which must divide the {num_q_heads} heads of q (GQA)")
    if seq_len == 0 or batch == 0 or head_dim == 0:
        raise ValueError(f"q must have non-empty B, N and D, got shape {tuple(q.shape)}")
    if v.shape[3] == 0:
        raise ValueError(f"v must have a non-empty head dim Dv, got shape {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")

    device = q.device
    key_class = _check_tensor("key_class", key_class, 2, "[B, N]")
    check_integer("key_class", key_class)
    if tuple(key_class.shape) != (batch, seq_len):
        raise ValueError(f"key_class must have shape [B={batch}, N={seq_len}], got {tuple(key_class.shape)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if query_rows is not None:
        query_rows = _check_tensor("query_rows", query_rows, 2, "[B, R]")
        check_integer("query_rows", query_rows)
        if query_rows.shape[0] != batch or query_rows.shape[1] == 0:
            raise ValueError(f"query_rows must have shape [B={batch}, R>=1], got {tuple(query_rows.shape)}")
    if key_padding_mask is not None:
        key_padding_mask = _check_tensor("key_padding_mask", key_padding_mask, 2, "[B, N]")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, seq_len):
            raise ValueError(
                f"key_padding_mask must have shape [B={batch}, N={seq_len}], got {tuple(key_padding_mask.shape)}")
    if sinks is not None:
        sinks = _check_tensor("sinks", sinks, 1, f"[Hq={num_q_heads}]")
        if tuple(sinks.shape) != (num_q_heads,):
            raise ValueError(f"sinks must have shape [Hq={num_q_heads}] (one logit per query head), "
                             f"got {tuple(sinks.shape)}")
        if not sinks.dtype.is_floating_point:
            raise ValueError(f"sinks must be a float tensor, got dtype {sinks.dtype}")
    for name, t in (("k", k), ("v", v), ("key_class", key_class), ("query_rows", query_rows),
                    ("key_padding_mask", key_padding_mask), ("sinks", sinks)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; all inputs must share one device")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")

    if check_values:  # one host sync
        flags = index_value_flags(key_class, num_classes, query_rows, seq_len)
        if sinks is not None:
            flags.append(~torch.isfinite(sinks.detach()).all())
        flags = torch.stack(flags).tolist()
        raise_for_index_values(flags, key_class, num_classes, query_rows, seq_len)
        if sinks is not None and flags[-1]:
            raise ValueError(f"sinks must be finite, got {sinks.detach().cpu().tolist()}")

    return LabelAttentionArgs(
        q=q, k=k, v=v, key_class=key_class.long(), num_classes=num_classes,
        query_rows=None if query_rows is None else query_rows.long(), causal=bool(causal), scale=float(scale),
        key_padding_mask=key_padding_mask, sinks=sinks,
    )
