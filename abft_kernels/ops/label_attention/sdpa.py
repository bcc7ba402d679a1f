"""torch scaled_dot_product_attention under label_attention's masking rules, without an N x N mask.

Without padding the mask is SDPA's own causal flag. With padding the rows are processed in chunks,
each with a bool mask of [B, 1, rows, N], so memory stays O(chunk · N). Rows that see no key at all
(e.g. left padding under a causal mask) give zeros, not NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import LabelAttentionArgs
from .masks import row_key_visibility

# Elements of the largest [B, H, rows, N] block a padded chunk may create.
_CHUNK_ELEMENTS = 1 << 26


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LabelAttentionArgs) -> torch.Tensor:
    """SDPA of q [B,Hq,N,D] over k [B,Hkv,N,D], v [B,Hkv,N,Dv] with args' causal flag and padding."""
    enable_gqa = q.shape[1] != k.shape[1]
    if args.key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, scale=args.scale, enable_gqa=enable_gqa)
    batch, num_heads, seq_len, _ = q.shape
    chunk = max(1, _CHUNK_ELEMENTS // (batch * num_heads * seq_len))
    outs = []
    for start in range(0, seq_len, chunk):
        rows = torch.arange(start, min(start + chunk, seq_len), device=q.device).expand(batch, -1)
        visible = row_key_visibility(args, rows)
        has_key = visible.any(-1, keepdim=True)
        # A row with no visible key would give NaN; let it see everything and zero it afterwards.
        mask = (visible | ~has_key)[:, None]
        out = F.scaled_dot_product_attention(
            q[:, :, start:start + rows.shape[1]], k, v, attn_mask=mask, scale=args.scale, enable_gqa=enable_gqa)
        outs.append(out * has_key[:, None].to(out.dtype))
    return torch.cat(outs, dim=2)
