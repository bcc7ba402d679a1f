"""Backend "cuda": the decoupled path of docs/design.md §2 with the compiled extension abft_kernels._C.

The attention output comes from torch SDPA (cuDNN / FlashAttention on GPU); the masses of the selected
rows come from the row kernel of csrc/, which reads K once per row: cost ≈ vendor attention + O(R·N·D).
Autograd adds the two paths' gradients of q and k. Semantics are those of the reference: empty slots
(-1) and rows that see no key get mass 0. The row kernel never reads v, so v's head dim Dv is free.

Attention sinks (docs/design.md §2 with one more logit per head that no key owns): the output comes from SDPA
over the sink as a virtual key (sink_key, as backend "torch"). The kernels know no sinks, but need none:
with the kernel's log-sum-exp lse of the visible keys and lse' = logaddexp(lse, sink), every probability
with the sink is P'[j] = P[j]·exp(lse − lse'), so mass' = mass·sigmoid(lse − sink). Their backward
recomputes P from the lse it is given and uses dS[j] = P[j]·(G[class(j)] − sum_c G_c·mass_c), which is
the exact gradient with the sink when given mass' and lse' (the sink is one more softmax entry whose
dP is 0). The sink's own gradient, dL/dsink = −sum over rows of P'_sink·sum_c G_c·mass'_c with
P'_sink = exp(sink − lse'), is O(B·H·R·C) in PyTorch. Empty slots and rows that see no key keep mass 0
and add nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .extension import cuda_extension_status, extension
from .validation import LabelAttentionArgs
from .masks import all_rows
from .sdpa import attention_output

if extension is None:
    raise ImportError(cuda_extension_status())

NAME = "cuda"
MAX_NUM_CLASSES = extension.MAX_NUM_CLASSES
SUPPORTED_HEAD_DIMS = tuple(extension.SUPPORTED_HEAD_DIMS)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported(args: LabelAttentionArgs) -> Optional[str]:
    """Why the compiled kernels cannot take these arguments, or None: CUDA tensors, float32/float16/bfloat16,
    q/k head dims SUPPORTED_HEAD_DIMS (v's head dim is free), num_classes <= MAX_NUM_CLASSES; sinks or not."""
    if not args.q.is_cuda:
        return f"q must be a CUDA tensor, got device {args.q.device}"
    if args.q.dtype not in SUPPORTED_DTYPES:
        return f"q must be float32, float16 or bfloat16, got {args.q.dtype}"
    head_dim = args.q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"q has head dim D={head_dim}; the kernels exist for D in {SUPPORTED_HEAD_DIMS} (use backend='torch')"
    if args.num_classes > MAX_NUM_CLASSES:
        return f"supports num_classes up to {MAX_NUM_CLASSES}, got num_classes={args.num_classes}"
    return None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and starting on a 16-byte boundary, as the kernels' vector loads need."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _sum_slot_grads(grad_q_rows: torch.Tensor, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """dq [B,Hq,N,D] in q's dtype from the per-slot row gradients [B,Hq,R,D] (empty slots are zero)."""
    batch, num_heads, seq_len, head_dim = q.shape
    grad_q = grad_q_rows.new_zeros(batch, seq_len, num_heads, head_dim)
    batch_index = torch.arange(batch, device=rows.device)[:, None].expand_as(rows)
    # On CUDA, accumulate=True sorts the indices and adds repeated rows in order: deterministic.
    grad_q.index_put_((batch_index, rows.clamp(min=0)), grad_q_rows.transpose(1, 2), accumulate=True)
    return grad_q.transpose(1, 2).to(q.dtype)


class CUDARowMassFunction(torch.autograd.Function):
    """mass float32 [B, Hq, R, C] of args.query_rows from the compiled kernels, differentiable in q, k and sinks
    (float [Hq] or None)."""

    @staticmethod
    def forward(ctx, q, k, sinks, args: LabelAttentionArgs):
        q, k = _aligned(q), _aligned(k)
        mass, lse = extension.row_mass_forward(q, k, args.query_rows, args.key_class, args.key_padding_mask,
                                               args.num_classes, args.causal, args.scale)
        sink = None
        if sinks is not None:
            sink = sinks.float()[None, :, None]  # [1, Hq, 1]
            mass = mass * torch.sigmoid(lse - sink)[..., None]  # exp(lse - lse'); 0 where lse = -inf
            lse = torch.logaddexp(lse, sink)
            ctx.sinks_dtype = sinks.dtype
        ctx.save_for_backward(q, k, mass, lse, sink)
        # q, k, v as ctx attributes would outlive backward while anything references the graph.
        ctx.args = dataclasses.replace(args, q=None, k=None, v=None)
        return mass

    @staticmethod
    def backward(ctx, grad_mass):
        q, k, mass, lse, sink = ctx.saved_tensors
        args = ctx.args
        grad_mass = grad_mass.float().contiguous()
        grad_q_rows, grad_k = extension.row_mass_backward(
            q, k, args.query_rows, args.key_class, args.key_padding_mask, grad_mass, mass, lse, args.causal,
            args.scale)
        grad_sinks = None
        if ctx.needs_input_grad[2]:
            grad_sinks = -(torch.exp(sink - lse) * (grad_mass * mass).sum(-1)).sum((0, 2)).to(ctx.sinks_dtype)
        return _sum_slot_grads(grad_q_rows, args.query_rows, q), grad_k, grad_sinks, None


def sdpa_with_cuda_row_mass(args: LabelAttentionArgs):
    out = attention_output(args)
    rows = all_rows(args) if args.query_rows is None else args.query_rows
    padding = None if args.key_padding_mask is None else args.key_padding_mask.contiguous()
    kernel_args = dataclasses.replace(args, query_rows=rows.contiguous(), key_class=args.key_class.contiguous(),
                                      key_padding_mask=padding)
    return out, CUDARowMassFunction.apply(args.q, args.k, args.sinks, kernel_args)
