"""The visibility rule (which keys a query row sees), row-gather and one-hot helpers of the op; the transformers
integration and the loss use the same rule through the op package's exports."""
from __future__ import annotations

from typing import Optional

import torch

from .validation import LabelAttentionArgs


def visible_keys(rows: torch.Tensor, seq_len: int, causal: bool, key_padding_mask: Optional[torch.Tensor] = None,
                 window: Optional[int] = None) -> torch.Tensor:
    """Which keys a query row sees: the one visibility rule of the op, the transformers integration and the loss.

    Row i (a position in the sequence) sees key j when all of these hold:

        real key       key_padding_mask[b, j]        (padding is never seen)
        causal         j <= i                        (when causal)
        window         j >  i - window               (a sliding window of `window` keys, the row's own included)
        slot           i >= 0                        (-1 marks an empty slot of `rows`: it sees nothing)

    e.g. N = 6, causal, window 3, key 4 padding, row 5:   keys  0 1 2 3 4 5
                                                        seen  . . . x . x

    The Triton kernel applies the same rule inside its loop (triton_backend), and `visible_label_counts` counts
    the label keys it lets through by prefix sums.

    Args:
        rows: long [B or 1, R], positions in [0, N) or -1 (empty slot).
        seq_len: N, the number of keys.
        causal: apply the causal rule.
        key_padding_mask: bool [B, N] (True = real token) or None (every key real).
        window: sliding-window length in keys, or None.

    Returns:
        bool [B or 1, R, N].
    """
    keys = torch.arange(seq_len, device=rows.device)
    visible = (rows >= 0)[:, :, None].expand(-1, -1, seq_len)
    if causal:
        visible = visible & (keys <= rows[:, :, None])
    if window is not None:
        visible = visible & (keys > rows[:, :, None] - window)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, :]
    return visible


def visible_to_rows(args: LabelAttentionArgs, rows: torch.Tensor) -> torch.Tensor:
    """`visible_keys` for the op's arguments: bool [B, R, N] for rows long [B, R]."""
    return visible_keys(rows, args.q.shape[2], args.causal, args.key_padding_mask)


def visible_label_counts(key_class: torch.Tensor, num_classes: int, rows: torch.Tensor,
                         key_padding_mask: Optional[torch.Tensor] = None, causal: bool = True):
    """Per row, what `visible_keys` lets it see, counted by prefix sums (O(N·C), not O(R·N)):
    (n_c long [B,R,C] visible label keys of each class, n_t long [B,R] visible real keys).

    key_class long [B,N] (-1 = not a label), rows long [B,R] (-1 = empty slot, counts 0).
    """
    real = torch.ones_like(key_class, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    one_hot = label_one_hot(key_class, num_classes, torch.bool) & real[:, :, None]
    if causal:
        class_counts = one_hot.long().cumsum(1)  # [B,N,C]
        token_counts = real.long().cumsum(1)  # [B,N]
        safe = rows.clamp(min=0)
        n_c = class_counts.gather(1, safe[:, :, None].expand(-1, -1, num_classes))
        n_t = token_counts.gather(1, safe)
    else:
        n_c = one_hot.long().sum(1, keepdim=True).expand(-1, rows.shape[1], -1)
        n_t = real.long().sum(1, keepdim=True).expand(-1, rows.shape[1])
    empty = rows < 0
    return n_c.masked_fill(empty[:, :, None], 0), n_t.masked_fill(empty, 0)


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
