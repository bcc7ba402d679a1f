"""torch scaled_dot_product_attention under label_attention's masking rules, without an N x N mask.

Without padding the mask is SDPA's own causal flag. With padding the rows are processed in chunks,
each with a bool mask of [B, 1, rows, N] built from the O(N) padding mask, so transient memory stays
O(chunk · N). Autograd keeps none of those masks: PaddedSDPAFunction saves q, k and v only and
recomputes each chunk in backward (activation checkpointing per chunk), so the memory kept for
backward is O(B·H·N·D) with or without padding. Rows that see no key at all (e.g. left padding under a
causal mask) give zeros, not NaN.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .validation import LabelAttentionArgs
from .masks import visible_to_rows
from .sink_key import drop_sink_position, with_sink_key

# Elements of the largest [B, H, rows, N] block a padded chunk may create.
_CHUNK_ELEMENTS = 1 << 26


def sdpa_broadcasts_kv_heads(device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool) -> bool:
    """Whether SDPA can read GQA's shared key/value heads itself (enable_gqa) without its O(N²) math kernel.

    On CUDA only the flash kernel takes enable_gqa (sm80 or newer, enabled, fp16/bf16, no attn_mask, head dim <= 256):
    the memory-efficient kernel, the one that runs fp32 and masked calls, rejects it, and SDPA silently falls back to
    math, which materialises B·H·N² scores (measured on an H200: 128 GiB asked for at N = 32768, Hq = 32, Hkv = 8,
    fp32). The CPU kernels take it in every case.
    """
    if device.type != "cuda":
        return True
    return (dtype in (torch.float16, torch.bfloat16) and not masked and head_dim <= 256
            and torch.backends.cuda.flash_sdp_enabled() and torch.cuda.get_device_capability(device) >= (8, 0))


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LabelAttentionArgs) -> torch.Tensor:
    """SDPA of q [B,Hq,N,D] over k [B,Hkv,N,D], v [B,Hkv,N,Dv] with args' causal flag and padding."""
    value_dim = v.shape[-1]
    if value_dim != q.shape[-1]:
        # SDPA's fused kernels need Dv == D; its math fallback would save P (B·H·N² floats) for backward. Zero
        # columns change no score (the scale is explicit) and no output column.
        width = max(value_dim, q.shape[-1])
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    masked = args.key_padding_mask is not None
    if q.shape[1] != k.shape[1] and not sdpa_broadcasts_kv_heads(q.device, q.dtype, q.shape[-1], masked):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # O(B·Hq·N·D), not O(N²)
    if not masked:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, scale=args.scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = PaddedSDPAFunction.apply(q, k, v, args)
    return out[..., :value_dim]


def autocast_inputs(q, k, v):
    """q, k and v as torch's scaled_dot_product_attention takes them under torch.autocast, and the context to
    compute in.

    SDPA is on autocast's lower-precision op list: inside `torch.autocast(device_type, dtype)` it casts its float16,
    bfloat16 and float32 inputs to `dtype` (float64 ones stay), so a float32 model under autocast runs its attention
    in `dtype` although the rotary embedding hands it q and k in float32 and v in `dtype`. label_attention and
    attention_output do the same and then compute with autocast off, so that what a backend computes in float32 (the
    masses, the sink logits) stays float32 instead of being recast to `dtype` by autocast's matmuls.

    Args:
        q, k, v: the attention's inputs (anything that is not a tensor is returned as is, for validation to name).

    Returns:
        (q, k, v, context): the inputs, cast when autocast is on for q's device type, and
        `torch.autocast(device_type, enabled=False)` then, else a context that changes nothing.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return q, k, v, contextlib.nullcontext()
    device_type = q.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return q, k, v, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    q, k, v = (t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (q, k, v))
    return q, k, v, torch.autocast(device_type, enabled=False)


def attention_output(args: LabelAttentionArgs) -> torch.Tensor:
    """The attention output [B,Hq,N,Dv] of args (no masses): masked_sdpa, with args.sinks as a virtual key
    (sink_key.py). O(B·H·N) memory with or without padding and sinks. Under torch.autocast q, k and v are cast
    as SDPA casts them (autocast_inputs): the output is then in the autocast dtype."""
    q, k, v, context = autocast_inputs(args.q, args.k, args.v)
    args = dataclasses.replace(args, q=q, k=k, v=v)
    with context:
        if args.sinks is None:
            return masked_sdpa(args.q, args.k, args.v, args)
        with_sink = with_sink_key(args)
        return drop_sink_position(masked_sdpa(with_sink.q, with_sink.k, with_sink.v, with_sink))


def _row_chunks(q: torch.Tensor):
    batch, num_heads, seq_len, _ = q.shape
    chunk = max(1, _CHUNK_ELEMENTS // (batch * num_heads * seq_len))
    for start in range(0, seq_len, chunk):
        yield slice(start, min(start + chunk, seq_len))


def _padded_chunk(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LabelAttentionArgs,
                  part: slice) -> torch.Tensor:
    """SDPA output [B,Hq,rows,Dv] of the query rows q_rows = q[:, :, part], under a bool mask built here from the
    padding mask."""
    rows = torch.arange(part.start, part.stop, device=q_rows.device).expand(q_rows.shape[0], -1)
    visible = visible_to_rows(args, rows)
    has_key = visible.any(-1, keepdim=True)
    # A row with no visible key would give NaN; let it see everything and zero it afterwards.
    mask = (visible | ~has_key)[:, None]
    out = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask, scale=args.scale,
                                         enable_gqa=q_rows.shape[1] != k.shape[1])
    return out * has_key[:, None].to(out.dtype)


class PaddedSDPAFunction(torch.autograd.Function):
    """masked_sdpa with a key padding mask: forward chunk by chunk, backward recomputes each chunk.

    Saving SDPA's autograd graph would keep every chunk's [B,1,rows,N] mask (B·N² elements in all); this saves
    q, k, v and recomputes one chunk at a time in backward (one extra forward of the attention).
    """

    @staticmethod
    def forward(ctx, q, k, v, args: LabelAttentionArgs):
        ctx.save_for_backward(q, k, v)
        ctx.args = dataclasses.replace(args, q=None, k=None, v=None)  # see TorchRowMassFunction: no tensors on ctx
        return torch.cat([_padded_chunk(q[:, :, part], k, v, args, part) for part in _row_chunks(q)], dim=2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        grad_q = torch.zeros_like(q) if wanted[0] else None
        grad_k = torch.zeros_like(k) if wanted[1] else None
        grad_v = torch.zeros_like(v) if wanted[2] else None
        k_leaf, v_leaf = k.detach().requires_grad_(wanted[1]), v.detach().requires_grad_(wanted[2])
        for part in _row_chunks(q):
            q_leaf = q[:, :, part].detach().requires_grad_(wanted[0])
            with torch.enable_grad():
                out = _padded_chunk(q_leaf, k_leaf, v_leaf, dataclasses.replace(ctx.args, q=q), part)
            inputs = [t for t, need in zip((q_leaf, k_leaf, v_leaf), wanted) if need]
            grads = iter(torch.autograd.grad(out, inputs, grad_out[:, :, part]))
            if wanted[0]:
                grad_q[:, :, part] = next(grads)
            if wanted[1]:
                grad_k += next(grads)
            if wanted[2]:
                grad_v += next(grads)
        return grad_q, grad_k, grad_v, None
