"""The compared ways of computing attention (and, for most, the label masses), one builder each.

A method's build(problem) returns forward() -> (out [B,Hq,N,D] or [B,N,Hq,D], mass [B,Hq,R,C] or None),
differentiable w.r.t. problem.q, k, v. unavailable(device, backward) gives the reason a method cannot
run here, or None.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import abft_kernels as ak
from abft_kernels.ops.label_attention import gather_rows, label_one_hot

from .shapes import KernelProblem, KernelShape, make_problem
from .timing import error_summary


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    computes_masses: bool
    build: Callable[[KernelProblem], Callable[[], tuple]]
    unavailable: Callable[[torch.device, bool], Optional[str]]
    memory_estimate: Optional[Callable[[KernelShape, bool], float]] = None  # bytes, for the size cap
    backend: Optional[str] = None  # label_attention's backend= for our methods (the rows record what it resolved to)


def _always_available(device: torch.device, backward: bool) -> Optional[str]:
    return None


def _gather_rows(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B,H,N,E], rows [B,R] -> [B,H,R,E]; rows=None keeps every row."""
    return x if rows is None else gather_rows(x, rows)


def _one_hot(problem: KernelProblem) -> torch.Tensor:
    """[B,1,N,C] label one-hot in the input dtype (unlabelled keys are zero rows)."""
    return label_one_hot(problem.key_class, problem.num_classes, problem.q.dtype)[:, None]


# 1. Eager attention that materialises P, like transformers' eager attention behind output_attentions.
def build_eager(problem: KernelProblem):
    group = problem.shape.heads // problem.shape.kv_heads
    seq_len = problem.shape.seq_len
    scale = problem.shape.head_dim ** -0.5
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=problem.q.device).triu(1)
    one_hot = _one_hot(problem)

    def forward():
        keys = problem.k.repeat_interleave(group, dim=1)
        values = problem.v.repeat_interleave(group, dim=1)
        scores = (problem.q @ keys.transpose(-1, -2) * scale).masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(problem.q.dtype)
        return probs @ values, _gather_rows(probs, problem.query_rows) @ one_hot

    return forward


def eager_memory(shape: KernelShape, backward: bool) -> float:
    """Scores, masked scores, fp32 softmax and P, each B·Hq·N² (about twice that with backward)."""
    elem = torch.finfo(shape.torch_dtype).bits // 8
    forward = shape.batch * shape.heads * shape.seq_len ** 2 * (3 * elem + 4)
    return forward * (2 if backward else 1)


# 2. torch SDPA without masses: the speed of light for the output path.
def build_sdpa(problem: KernelProblem):
    def forward():
        return F.scaled_dot_product_attention(problem.q, problem.k, problem.v, is_causal=True, enable_gqa=True), None

    return forward


# 3, 7. label_attention itself, by backend.
def build_label_attention(backend: str):
    def build(problem: KernelProblem):
        def forward():
            return ak.label_attention(problem.q, problem.k, problem.v, problem.key_class, problem.num_classes,
                                      query_rows=problem.query_rows, causal=True, backend=backend)

        return forward

    return build


def gpu_backend_unavailable(backend: str):
    def unavailable(device: torch.device, backward: bool) -> Optional[str]:
        if not ak.backend_available(backend):
            return f"backend {backend!r} is not available: {ak.backend_status(backend)}"
        if device.type != "cuda":  # (Triton's CPU interpreter runs the kernels for tests, far too slowly to time)
            return f"backend {backend!r} is timed on CUDA devices only"
        return None

    return unavailable


# 4. SDPA with the one-hot label matrix appended to V, computed in the input dtype.
def build_sdpa_one_hot(problem: KernelProblem):
    shape = problem.shape
    group = shape.heads // shape.kv_heads
    # Zero columns round the value width up to a multiple of 8, which SDPA's fused kernels need.
    pad = -(shape.head_dim + shape.num_classes) % 8
    labels = torch.cat([_one_hot(problem), problem.q.new_zeros(shape.batch, 1, shape.seq_len, pad)], dim=-1)
    labels = labels.expand(-1, shape.kv_heads, -1, -1)

    def forward():
        # K and V are repeated to Hq heads because the fused kernels that take a value width different
        # from the query's do not all take GQA.
        keys = problem.k.repeat_interleave(group, dim=1)
        values = torch.cat([problem.v, labels], dim=-1).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(problem.q, keys, values, is_causal=True)
        mass = out[..., shape.head_dim:shape.head_dim + shape.num_classes]
        return out[..., :shape.head_dim], _gather_rows(mass, problem.query_rows)

    return forward


# 5. FlexAttention: the output and its log-sum-exp, then one call whose query rows are the selected rows
# repeated once per class, each seeing only the keys of its class: mass_c = exp(lse_c - lse).
@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)


def build_flex(problem: KernelProblem):
    from torch.nn.attention.flex_attention import AuxRequest

    flex, block_mask_of = _compiled_flex()
    torch._dynamo.reset()  # one compile per shape, so sweeps never reach dynamo's recompile limit
    shape = problem.shape
    rows = problem.row_positions
    num_rows = rows.shape[1]
    key_class = problem.key_class
    device = problem.q.device

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def causal_for_row(b, h, q_idx, kv_idx):  # query row i of the class call is row rows[b, i % R]
        return kv_idx <= rows[b, q_idx % num_rows]

    def keys_of_its_class(score, b, h, q_idx, kv_idx):
        return torch.where(key_class[b, kv_idx] == q_idx // num_rows, score, -float("inf"))

    # Block masks depend only on the row positions, so they are built once, outside the timed calls.
    output_mask = block_mask_of(causal, None, None, shape.seq_len, shape.seq_len, device=device)
    class_mask = block_mask_of(causal_for_row, shape.batch, None, shape.num_classes * num_rows, shape.seq_len,
                               device=device)
    lse_only = AuxRequest(lse=True)

    def forward():
        out, aux = flex(problem.q, problem.k, problem.v, block_mask=output_mask, enable_gqa=True, return_aux=lse_only)
        q_rows = _gather_rows(problem.q, problem.query_rows).repeat(1, 1, shape.num_classes, 1)
        _, class_aux = flex(q_rows, problem.k, problem.v, score_mod=keys_of_its_class, block_mask=class_mask,
                            enable_gqa=True, return_aux=lse_only)
        lse = _gather_rows(aux.lse[..., None], problem.query_rows)[..., 0]  # [B,H,R]
        class_lse = class_aux.lse.unflatten(-1, (shape.num_classes, num_rows))  # [B,H,C,R]
        return out, torch.exp(class_lse - lse[:, :, None]).transpose(-1, -2)

    return forward


@lru_cache(maxsize=None)
def _flex_unavailable(device_type: str, backward: bool) -> Optional[str]:
    """Whether compiled FlexAttention with return_lse (and its backward) runs here: tried on a tiny problem."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if backward and _flex_unavailable(device_type, False) is not None:
        return _flex_unavailable(device_type, False)
    device = torch.device(device_type)
    tiny = KernelShape(1, 2, 1, 16, 64, "demos", "bfloat16", num_classes=2, demo_len=16)
    try:
        out, mass = build_flex(make_problem(tiny, device, requires_grad=backward))()
        if backward:
            torch.autograd.backward([out, mass], [torch.ones_like(out), torch.ones_like(mass)])
    except Exception as error:  # every failure here means "cannot run on this device"; its message says why
        return f"compiled FlexAttention failed on a tiny problem: {error_summary(error)}"
    return None


def flex_unavailable(device: torch.device, backward: bool) -> Optional[str]:
    return _flex_unavailable(device.type, backward)


# 6. flash-attn's flash_attn_func: the output only, in its [B, N, H, D] layout (no copies: stride(-1) is 1).
def build_flash_attn(problem: KernelProblem):
    from flash_attn import flash_attn_func

    def forward():
        out = flash_attn_func(problem.q.transpose(1, 2), problem.k.transpose(1, 2), problem.v.transpose(1, 2),
                              causal=True)
        return out, None

    return forward


def flash_attn_unavailable(device: torch.device, backward: bool) -> Optional[str]:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if device.type != "cuda":
        return "flash-attn needs a CUDA device"
    try:
        import flash_attn  # noqa: F401
    except ImportError as error:
        return f"flash-attn does not import: {error}"
    return None


METHODS = {m.name: m for m in (
    Method("eager", "eager attention materialising P (transformers' output_attentions path), mass = P·Y",
           True, build_eager, _always_available, eager_memory),
    Method("sdpa", "torch SDPA, no masses (speed of light for the output)", False, build_sdpa, _always_available),
    Method("auto", "ours, backend='auto': the backend auto chooses for the shape (recorded in the row)", True,
           build_label_attention("auto"), _always_available, backend="auto"),
    Method("torch", "ours, backend='torch': SDPA + exact recompute of the selected rows", True,
           build_label_attention("torch"), _always_available, backend="torch"),
    Method("sdpa_onehot", "SDPA with the one-hot label matrix appended to V (input dtype)", True,
           build_sdpa_one_hot, _always_available),
    Method("flex", "compiled FlexAttention, masses from per-class log-sum-exps", True, build_flex,
           flex_unavailable),
    Method("flash_attn", "flash-attn flash_attn_func, no masses", False, build_flash_attn, flash_attn_unavailable),
    Method("triton", "ours, backend='triton': fused Triton kernel", True, build_label_attention("triton"),
           gpu_backend_unavailable("triton"), backend="triton"),
    Method("cuda", "ours, backend='cuda': compiled CUDA extension", True, build_label_attention("cuda"),
           gpu_backend_unavailable("cuda"), backend="cuda"),
)}
