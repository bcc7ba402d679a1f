"""Attention sinks for the SDPA-based paths: the sink as one more key (exact; torch SDPA has no sink argument).

With sinks, head h's softmax has an extra logit sinks[h] that no value and no class receives (gpt-oss's s_aux).
That is ordinary attention over one more key: position 0 of a problem one position longer holds a virtual key
that every row sees, whose score is sinks[h] for query head h, with value 0 and class -1::

    q' = [0 (virtual row 0); q, hi_h, lo_h, 0 ...]    k' = [0 .. 0, 1, 1, 0 ...  (the sink key); k, 0, 0, 0 ...]
    v' = [0; v]    key_class' = [-1; key_class]    key_padding_mask' = [True; key_padding_mask]    rows' = rows + 1

with the explicit scale, so that scale·q'·k' = scale·q·k for the real keys and scale·(hi_h + lo_h) = sinks[h] for
the sink key. hi_h + lo_h is sinks[h] / scale split over two coordinates in q's dtype (hi rounded to the dtype, lo
the rest), which keeps the sink's logit to about twice the dtype's precision (exact in fp32 up to rounding) in
fp16/bf16 too. The extra coordinates round the head dim up to a multiple of 8, as SDPA's fast kernels want.
Causality carries over: row i + 1 of the longer problem sees keys 0 .. i + 1, the sink and the real keys 0 .. i.
The virtual row 0 is dropped from the output. Autograd through the construction gives the sinks' gradient.
"""
from __future__ import annotations

import dataclasses

import torch

from .validation import LabelAttentionArgs

SINK_COORDS = 2  # hi and lo of sinks / scale


def with_sink_key(args: LabelAttentionArgs) -> LabelAttentionArgs:
    """The sink-free problem one position longer whose attention over positions 1 .. N is args' attention with sinks."""
    q, k, v = args.q, args.k, args.v
    batch, num_q_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    padded_dim = -(-(head_dim + SINK_COORDS) // 8) * 8
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logit = args.sinks.to(compute_dtype) / args.scale
    hi = logit.to(q.dtype).to(compute_dtype)  # exactly representable in q's dtype
    # Expanded before the cast to q's dtype, so that autograd sums the rows' gradients in fp32 (fp64).
    sink_coords = torch.stack([hi, logit - hi], dim=-1)[None, :, None, :].expand(batch, -1, seq_len, -1).to(q.dtype)
    q_rows = torch.cat([q, sink_coords,
                        q.new_zeros(batch, num_q_heads, seq_len, padded_dim - head_dim - SINK_COORDS)], dim=-1)
    q_ext = torch.cat([q_rows.new_zeros(batch, num_q_heads, 1, padded_dim), q_rows], dim=2)
    sink_key = k.new_zeros(batch, num_kv_heads, 1, padded_dim)
    sink_key[..., head_dim:head_dim + SINK_COORDS] = 1
    k_ext = torch.cat([sink_key, torch.nn.functional.pad(k, (0, padded_dim - head_dim))], dim=2)
    v_ext = torch.cat([v.new_zeros(batch, num_kv_heads, 1, v.shape[-1]), v], dim=2)
    key_class = args.key_class  # None on the output-only path (no masses)
    if key_class is not None:
        key_class = torch.cat([key_class.new_full((batch, 1), -1), key_class], dim=1)
    padding = args.key_padding_mask
    if padding is not None:
        padding = torch.cat([padding.new_ones(batch, 1), padding], dim=1)
    rows = args.query_rows
    if rows is not None:
        rows = torch.where(rows >= 0, rows + 1, rows)
    return dataclasses.replace(args, q=q_ext, k=k_ext, v=v_ext, key_class=key_class, key_padding_mask=padding,
                               query_rows=rows, sinks=None)


def drop_sink_position(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N + 1, E] of the longer problem -> [B, H, N, E]: without the virtual row 0."""
    return x[:, :, 1:]
