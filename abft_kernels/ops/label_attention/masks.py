"""Visibility, row-gather and one-hot helpers shared by the PyTorch backends."""
from __future__ import annotations

import torch

from .validation import LabelAttentionArgs


def row_key_visibility(args: LabelAttentionArgs, rows: torch.Tensor) -> torch.Tensor:
    """bool [B, R, N]: key j is visible to row rows[b, r] (padding, causality, -1 = empty slot)."""
    batch, _, seq_len, _ = args.q.shape
    keys = torch.arange(seq_len, device=rows.device)
    visible = (rows >= 0)[:, :, None].expand(batch, rows.shape[1], seq_len)
    if args.causal:
        visible = visible & (keys[None, None, :] <= rows[:, :, None])
    if args.key_padding_mask is not None:
        visible = visible & args.key_padding_mask[:, None, :]
    return visible


def all_rows(args: LabelAttentionArgs) -> torch.Tensor:
    batch, _, seq_len, _ = args.q.shape
    return torch.arange(seq_len, device=args.q.device).expand(batch, seq_len)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, E], rows int [B, R] (>= 0) -> [B, H, R, E]: the same rows of every head."""
    index = rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return x.gather(2, index)


def label_one_hot(key_class: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, N, C] one-hot of key_class [B, N]; unlabelled keys (-1) are all-zero rows."""
    classes = torch.arange(num_classes, device=key_class.device)
    return (key_class[:, :, None] == classes).to(dtype)


def mass_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Masses accumulate in fp32 (fp64 when the inputs are fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
