"""Backend "cuda": the decoupled path of design.md §2 with the compiled extension abft_kernels._C.

The attention output comes from torch SDPA (cuDNN / FlashAttention on GPU); the masses of the selected
rows come from the row kernel of csrc/, which reads K once per row: cost ≈ vendor attention + O(R·N·D).
Autograd adds the two paths' gradients of q and k. Semantics are those of the reference: empty slots
(-1) and rows that see no key get mass 0.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .extension import cuda_extension_status, extension
from .validation import LabelAttentionArgs
from .masks import all_rows
from .sdpa import masked_sdpa

if extension is None:
    raise ImportError(cuda_extension_status())

NAME = "cuda"
MAX_NUM_CLASSES = extension.MAX_NUM_CLASSES
SUPPORTED_HEAD_DIMS = tuple(extension.SUPPORTED_HEAD_DIMS)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported(args: LabelAttentionArgs) -> Optional[str]:
    """Why the compiled kernels cannot take these arguments, or None: CUDA tensors, float32/float16/bfloat16,
    head dims SUPPORTED_HEAD_DIMS, num_classes <= MAX_NUM_CLASSES."""
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
    """mass float32 [B, Hq, R, C] of args.query_rows from the compiled kernels, differentiable in q and k."""

    @staticmethod
    def forward(ctx, q, k, args: LabelAttentionArgs):
        q, k = _aligned(q), _aligned(k)
        mass, lse = extension.row_mass_forward(q, k, args.query_rows, args.key_class, args.key_padding_mask,
                                               args.num_classes, args.causal, args.scale)
        ctx.save_for_backward(q, k, mass, lse)
        # q, k, v as ctx attributes would outlive backward while anything references the graph.
        ctx.args = dataclasses.replace(args, q=None, k=None, v=None)
        return mass

    @staticmethod
    def backward(ctx, grad_mass):
        q, k, mass, lse = ctx.saved_tensors
        args = ctx.args
        grad_q_rows, grad_k = extension.row_mass_backward(
            q, k, args.query_rows, args.key_class, args.key_padding_mask, grad_mass.float().contiguous(), mass, lse,
            args.causal, args.scale)
        return _sum_slot_grads(grad_q_rows, args.query_rows, q), grad_k, None


def label_attention(args: LabelAttentionArgs):
    out = masked_sdpa(args.q, args.k, args.v, args)
    rows = all_rows(args) if args.query_rows is None else args.query_rows
    padding = None if args.key_padding_mask is None else args.key_padding_mask.contiguous()
    kernel_args = dataclasses.replace(args, query_rows=rows.contiguous(), key_class=args.key_class.contiguous(),
                                      key_padding_mask=padding)
    return out, CUDARowMassFunction.apply(args.q, args.k, kernel_args)
