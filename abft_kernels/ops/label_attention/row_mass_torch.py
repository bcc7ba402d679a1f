"""Label masses of R selected query rows in plain PyTorch: the decoupled path of docs/design.md §2.

Forward computes, per (batch, head, row), the softmax over the keys the row sees and its mass on each
label class; backward recomputes the probabilities instead of saving them. Rows are processed in
chunks so transient memory is O(B·H·chunk·N) and saved memory O(B·H·R).
"""
from __future__ import annotations

import dataclasses

import torch

from .validation import LabelAttentionArgs
from .masks import gather_rows, label_one_hot, mass_compute_dtype, visible_to_rows

_CHUNK_ELEMENTS = 1 << 25


def _row_chunks(args: LabelAttentionArgs):
    batch, num_heads, seq_len, _ = args.q.shape
    num_rows = args.query_rows.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (batch * num_heads * seq_len))
    for start in range(0, num_rows, chunk):
        yield slice(start, min(start + chunk, num_rows))


def _row_probs(args: LabelAttentionArgs, q_rows: torch.Tensor, k: torch.Tensor, rows: torch.Tensor):
    """Softmax rows [B,Hkv,G,Rc,N] of the selected rows (zero where invisible or for empty slots)."""
    batch, num_kv_heads, seq_len, head_dim = k.shape
    # A query group's rows side by side, [B,Hkv,G·Rc,D]: one matmul per key head, no G-fold copy of k.
    scores = args.scale * q_rows.view(batch, num_kv_heads, -1, head_dim) @ k.transpose(-1, -2)
    scores = scores.view(batch, num_kv_heads, -1, rows.shape[1], seq_len)
    visible = visible_to_rows(args, rows)[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores - lse.nan_to_num(neginf=0.0))


class TorchRowMassFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, args: LabelAttentionArgs):
        compute_dtype = mass_compute_dtype(q.dtype)
        kc = k.to(compute_dtype)  # q only row by row: a whole fp32 copy of q would be O(B·Hq·N·D) for R rows
        one_hot = label_one_hot(args.key_class, args.num_classes, compute_dtype)[:, None, None]  # [B,1,1,N,C]
        rows = args.query_rows.clamp(min=0)
        batch, num_heads = q.shape[:2]
        masses = []
        for part in _row_chunks(args):
            q_rows = gather_rows(q, rows[:, part]).to(compute_dtype)
            probs = _row_probs(args, q_rows, kc, args.query_rows[:, part])
            masses.append((probs @ one_hot).reshape(batch, num_heads, -1, args.num_classes))
        mass = torch.cat(masses, dim=2)
        ctx.save_for_backward(q, k, mass)
        # Not q, k, v themselves: a ctx attribute outlives backward for as long as anything references the graph
        # (e.g. a loss kept for logging), and would keep every layer's q, k, v alive.
        ctx.args = dataclasses.replace(args, q=None, k=None, v=None)
        return mass.float()

    @staticmethod
    def backward(ctx, grad_mass):
        q, k, mass = ctx.saved_tensors
        args = dataclasses.replace(ctx.args, q=q, k=k)
        compute_dtype = mass.dtype
        kc = k.to(compute_dtype)
        grad_mass = grad_mass.to(compute_dtype)
        one_hot = label_one_hot(args.key_class, args.num_classes, compute_dtype)[:, None, None]
        rows = args.query_rows.clamp(min=0)
        batch, num_kv_heads, _, head_dim = k.shape
        # dq is nonzero on the R rows only: it is scattered into q's dtype (a repeated row's gradients add there).
        grad_q = torch.zeros_like(q)
        grad_k = torch.zeros_like(kc)
        for part in _row_chunks(args):
            q_rows = gather_rows(q, rows[:, part]).to(compute_dtype)
            probs = _row_probs(args, q_rows, kc, args.query_rows[:, part])  # [B,Hkv,G,Rc,N]
            g = grad_mass[:, :, part].view(batch, num_kv_heads, -1, probs.shape[3], args.num_classes)
            m = mass[:, :, part].view_as(g)
            # dP[r, j] = G[r, class(j)]; softmax backward subtracts sum_j P dP = sum_c G·mass.
            grad_scores = probs * (g @ one_hot.transpose(-1, -2) - (g * m).sum(-1, keepdim=True))
            grad_scores = grad_scores.view(batch, num_kv_heads, -1, grad_scores.shape[-1])  # [B,Hkv,G·Rc,N]
            grad_k += args.scale * grad_scores.transpose(-1, -2) @ q_rows.view(batch, num_kv_heads, -1, head_dim)
            grad_q_rows = (args.scale * grad_scores @ kc).view(q_rows.shape)  # [B,Hq,Rc,D]
            index = rows[:, None, part, None].expand_as(grad_q_rows)
            grad_q.scatter_add_(2, index, grad_q_rows.to(q.dtype))
        return grad_q, grad_k.to(k.dtype), None


def row_label_mass(args: LabelAttentionArgs) -> torch.Tensor:
    """mass float32 [B, Hq, R, C] of args.query_rows, differentiable w.r.t. q and k."""
    return TorchRowMassFunction.apply(args.q, args.k, args)
