"""The oracle: materialises every N x N attention matrix in float64. For tests only (O(B·H·N²) memory).

Attention sinks are one more column of the float64 scores, seen by every row, whose probability is dropped after
the softmax: no value and no class receives it. v may have its own head dim Dv.
"""
from __future__ import annotations

import torch

from .validation import LabelAttentionArgs
from .masks import all_rows, gather_rows, label_one_hot, visible_to_rows

NAME = "reference"


def unsupported(args: LabelAttentionArgs):
    """Takes every valid call (float64 compute, any device, sinks, any Dv)."""
    return None


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to visible entries; rows with nothing visible are all zero."""
    any_visible = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)


def reference_label_attention(args: LabelAttentionArgs):
    q, k, v = (t.double() for t in (args.q, args.k, args.v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = args.scale * q @ k.transpose(-1, -2)
    visible = visible_to_rows(args, all_rows(args))[:, None].expand(scores.shape)
    if args.sinks is not None:  # column N: the sink, seen by every row
        batch, num_heads, seq_len, _ = scores.shape
        sink_column = args.sinks.double()[None, :, None, None].expand(batch, num_heads, seq_len, 1)
        scores = torch.cat([scores, sink_column], dim=-1)
        visible = torch.cat([visible, visible.new_ones(batch, num_heads, seq_len, 1)], dim=-1)
    probs = masked_softmax(scores, visible)[..., :k.shape[2]]
    out = (probs @ v).to(args.q.dtype)
    mass = probs @ label_one_hot(args.key_class, args.num_classes, torch.float64)[:, None]  # [B, Hq, N, C]
    if args.query_rows is not None:
        mass = gather_rows(mass, args.query_rows.clamp(min=0)) * (args.query_rows >= 0)[:, None, :, None]
    return out, mass.float()
