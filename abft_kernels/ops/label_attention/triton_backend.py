"""Backend "triton": one fused flash-attention kernel that also returns the per-class label masses.

Forward (design.md §2): the usual online softmax over key blocks, plus a second accumulator
`mass_acc = mass_acc * alpha + P_blk @ onehot(class of the block's keys)` in fp32, divided by the row
sum at the end. It writes the output (input dtype), the log-sum-exp (fp32) and the masses of the
selected rows. Backward recomputes P from the log-sum-exp with
`dP = dO·Vᵀ + G[row, class(key)]` and `Delta = rowsum(dO * O) + sum_c G·mass`, so no N x N tensor
exists anywhere and autograd saves only O(N) tensors.

Selected rows: a per-(batch, row) map `row_slot` gives each selected row one compact slot of the mass
buffer [B, Hq, S, C] (-1 = no mass). Kernels do mass work only in query blocks that hold a selected
row, so with one query row per sample (ABFT) the masses cost one block per head. The host gathers
the slots to [B, Hq, R, C]; autograd of that gather sums the gradients of repeated rows.

Keys are described by one int32 code per (batch, position): the class id, -1 for a real key without
a label, NOT_A_KEY (-2) for padding. Out-of-range positions load as NOT_A_KEY, so one mask covers
padding and the ragged last block.

v may have its own head dim Dv (multi-head latent attention): v, out, dO and dV tiles are BLOCK_DV wide,
q, k, dQ and dK tiles BLOCK_D.

Attention sinks (gpt-oss): one more logit per query head in every row's denominator that no value and
no class receives. The forward starts each row's online softmax with it, running max = sink and running
sum = 1 (in base-2 units) instead of -inf and 0, so out, mass and the saved lse_log2 are those of the
softmax with the sink; rows that see no key give out = mass = 0 and lse_log2 = sink. The backward
kernels need no change: P recomputed from that lse is the probability with the sink, and the sink's dP is
0, so dS, dQ, dK, dV and Delta keep their form. The sink's gradient, dL/dsink = -sum over batch and rows of
P_sink·Delta with P_sink = exp2(sink_log2 - lse_log2), is O(B·H·N) in PyTorch after the kernels.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .validation import LabelAttentionArgs
from .masks import gather_rows

# The mass accumulator is [BLOCK_M, num_classes padded to a power of two] fp32 registers per program.
NAME = "triton"
MAX_NUM_CLASSES = 64
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The interpreter (CPU) mis-computes bf16 dots and cannot autotune: it gets fp32 dots and one config.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The kernels work in base 2 (exp2 is the fast path): scores are scaled by scale·log2(e), and the saved
# log-sum-exp lse_log2 is in those units.
LOG2E = 1.4426950408889634
NOT_A_KEY = tl.constexpr(-2)


# ----------------------------------------------------------------------------------------------------
# Autotune table: candidate (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) per padded head
# dim. The autotuner times them on the GPU at hand once per head dim, dtype and causality; sequence
# length is left out of the key so that prompts of varying length do not retune. The last candidate of
# each list is small enough to fit any GPU's shared memory (the autotuner skips those that do not).
# These are starting points, not measured choices.
# ----------------------------------------------------------------------------------------------------
_GPU_CANDIDATES = {
    "forward": {
        64: [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
        128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
        256: [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    },
    "backward": {
        64: [(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 32, 4, 1)],
        128: [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
        256: [(32, 64, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
    },
}
# Under the interpreter every step costs Python overhead, so blocks are large; BLOCK_M != BLOCK_N so that
# the tests cover the block-boundary arithmetic between query and key blocks.
_INTERPRETER_BLOCKS = {"forward": (64, 32), "backward": (32, 64)}


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def _autotune(kind: str):
    """triton.autotune over the candidates of the launch's head dim (a single config under the interpreter)."""
    if _INTERPRET:
        block_m, block_n = _INTERPRETER_BLOCKS[kind]
        return triton.autotune(configs=[triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n})], key=[])
    table = {bucket: [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                      for m, n, w, s in candidates]
             for bucket, candidates in _GPU_CANDIDATES[kind].items()}

    def for_head_dim(configs, named_args, **kwargs):
        return table[_head_dim_bucket(max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"]))]

    all_configs = [config for configs in table.values() for config in configs]
    return triton.autotune(configs=all_configs, key=["BLOCK_D", "BLOCK_DV", "CAUSAL", "DOT_FP32"],
                           prune_configs_by={"early_config_prune": for_head_dim})


# ----------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b accumulated in fp32. FP32 also runs the products in full fp32 (fp32 inputs, the masses, and
    the interpreter); otherwise the operands stay in fp16/bf16 for the tensor cores."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_tile(base, rows, dims, stride_row, seq_len, head_dim):
    mask = (rows[:, None] < seq_len) & (dims[None, :] < head_dim)
    return tl.load(base + rows[:, None] * stride_row + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, tile, rows, dims, stride_row, seq_len, head_dim):
    mask = (rows[:, None] < seq_len) & (dims[None, :] < head_dim)
    tl.store(base + rows[:, None] * stride_row + dims[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _class_rows_mask(slots, classes, num_classes):
    return (slots[:, None] >= 0) & (classes[None, :] < num_classes)


@triton.jit
def _load_class_rows(base, slots, classes, num_classes):
    """[BLOCK_M, BLOCK_C] fp32 rows `slots` of a [S, C] mass-shaped buffer; zero where slot == -1."""
    mask = _class_rows_mask(slots, classes, num_classes)
    return tl.load(base + slots[:, None] * num_classes + classes[None, :], mask=mask, other=0.0)


@triton.jit
def _one_hot(key_code, classes):
    """[BLOCK_N, BLOCK_C] fp32 one-hot of the keys' classes; unlabelled keys and non-keys are zero rows."""
    return (key_code[:, None] == classes[None, :]).to(tl.float32)


@triton.jit
def _visible(rows, keys, key_code, seq_len, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: row sees key (a real key, a real row, and causally before it if CAUSAL)."""
    visible = (key_code[None, :] != NOT_A_KEY) & (rows[:, None] < seq_len)
    if CAUSAL:
        visible = visible & (keys[None, :] <= rows[:, None])
    return visible


@triton.jit
def _key_block_end(row_start, seq_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the key range a query block [row_start, row_start + BLOCK_M) can see."""
    if CAUSAL:
        return tl.minimum(seq_len, row_start + BLOCK_M)
    return seq_len


@triton.jit
def _probs(q, k, lse_log2, rows, keys, key_code, seq_len, scale_log2, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr):
    """Recomputed softmax tile P [BLOCK_M, BLOCK_N]; rows without any visible key have lse_log2 = +inf, so P = 0."""
    scores = _dot(q, tl.trans(k), DOT_FP32) * scale_log2
    return tl.where(_visible(rows, keys, key_code, seq_len, CAUSAL), tl.exp2(scores - lse_log2[:, None]), 0.0)


@triton.jit
def _grad_scores(p, do, v, delta, grad_mass_rows, key_code, classes, block_has_mass,
                 HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr):
    """dS = P * (dP - Delta) with dP = dO·Vᵀ + G[row, class(key)] (design.md §2)."""
    dp = tl.zeros_like(p)
    if HAS_OUT_GRAD:
        dp += _dot(do, tl.trans(v), DOT_FP32)
    if HAS_MASS_GRAD:
        if block_has_mass:  # uniform per program: blocks without selected rows skip the mass term
            dp += _dot(grad_mass_rows, tl.trans(_one_hot(key_code, classes)), True)
    return p * (dp - delta[:, None])


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
@_autotune("forward")
@triton.jit
def label_attention_forward_kernel(
    Q, K, V, KeyCode, RowSlot, SinksLog2, Out, LseLog2, Mass,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    num_q_heads, group_size, seq_len, head_dim, value_dim, num_slots, num_classes, scale_log2,
    CAUSAL: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_block, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // num_q_heads, batch_head % num_q_heads
    kv_head = head // group_size  # GQA by index arithmetic: K/V are never repeated
    batch64, head64, kv_head64 = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    K += batch64 * stride_kb + kv_head64 * stride_kh
    V += batch64 * stride_vb + kv_head64 * stride_vh
    KeyCode += batch64 * seq_len

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    classes = tl.arange(0, BLOCK_C)
    q = _load_tile(Q + batch64 * stride_qb + head64 * stride_qh, rows, dims, stride_qn, seq_len, head_dim)
    slots = tl.load(RowSlot + batch64 * seq_len + rows, mask=rows < seq_len, other=-1)
    block_has_mass = tl.max(slots, 0) >= 0

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the sink is one more logit of every row: it starts the running max and sum
        row_max = tl.zeros([BLOCK_M], tl.float32) + tl.load(SinksLog2 + head)
        row_sum = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    mass_acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for key_start in range(0, _key_block_end(row_block * BLOCK_M, seq_len, BLOCK_M, CAUSAL), BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_code = tl.load(KeyCode + keys, mask=keys < seq_len, other=NOT_A_KEY)
        k = _load_tile(K, keys, dims, stride_kn, seq_len, head_dim)
        v = _load_tile(V, keys, dims_v, stride_vn, seq_len, value_dim)
        scores = _dot(q, tl.trans(k), DOT_FP32) * scale_log2
        scores = tl.where(_visible(rows, keys, key_code, seq_len, CAUSAL), scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row that has seen no key yet keeps max -inf; shift by 0 then so that P = 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - shift[:, None])
        alpha = tl.exp2(row_max - shift)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        if block_has_mass:  # uniform per program: blocks without selected rows skip the mass work
            mass_acc = mass_acc * alpha[:, None] + _dot(p, _one_hot(key_code, classes), True)
        row_max = new_max

    # Rows that see no key (row_sum == 0) give out = 0, mass = 0 and lse_log2 = +inf (P = 0 in backward); with a
    # sink they have row_sum = 1 and lse_log2 = sink, and out = mass = 0 as well.
    safe_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    out = acc / safe_sum[:, None]
    _store_tile(Out + batch64 * stride_ob + head64 * stride_oh, out, rows, dims_v, stride_on, seq_len, value_dim)
    lse_log2 = tl.where(row_sum == 0.0, float("inf"), row_max + tl.log2(safe_sum))
    tl.store(LseLog2 + batch_head.to(tl.int64) * seq_len + rows, lse_log2, mask=rows < seq_len)
    if block_has_mass:
        mass_base = Mass + batch_head.to(tl.int64) * num_slots * num_classes
        tl.store(mass_base + slots[:, None] * num_classes + classes[None, :], mass_acc / safe_sum[:, None],
                 mask=_class_rows_mask(slots, classes, num_classes))


@triton.jit
def label_attention_backward_delta_kernel(
    Out, GradOut, Mass, GradMass, RowSlot, Delta,
    stride_ob, stride_oh, stride_on, stride_gb, stride_gh, stride_gn,
    num_q_heads, seq_len, value_dim, num_slots, num_classes,
    HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta[row] = rowsum(dO * O) + sum_c G[row, c] * mass[row, c]."""
    row_block, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // num_q_heads, batch_head % num_q_heads
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    delta = tl.zeros([BLOCK_M], tl.float32)
    if HAS_OUT_GRAD:
        dims_v = tl.arange(0, BLOCK_DV)
        out = _load_tile(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh,
                         rows, dims_v, stride_on, seq_len, value_dim)
        grad_out = _load_tile(GradOut + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh,
                              rows, dims_v, stride_gn, seq_len, value_dim)
        delta += tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    if HAS_MASS_GRAD:
        classes = tl.arange(0, BLOCK_C)
        slots = tl.load(RowSlot + batch.to(tl.int64) * seq_len + rows, mask=rows < seq_len, other=-1)
        offset = batch_head.to(tl.int64) * num_slots * num_classes
        mass = _load_class_rows(Mass + offset, slots, classes, num_classes)
        grad_mass = _load_class_rows(GradMass + offset, slots, classes, num_classes)
        delta += tl.sum(mass * grad_mass, 1)
    tl.store(Delta + batch_head.to(tl.int64) * seq_len + rows, delta, mask=rows < seq_len)


@_autotune("backward")
@triton.jit
def label_attention_backward_dkdv_kernel(
    Q, K, V, GradOut, KeyCode, RowSlot, LseLog2, Delta, GradMass, GradK, GradV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    num_kv_heads, group_size, seq_len, head_dim, value_dim, num_slots, num_classes, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one KV head. The program loops over every query head of the GQA group
    and every query block that sees these keys, so each dK/dV element is written once: no atomics."""
    key_block, batch_kv_head = tl.program_id(0), tl.program_id(1)
    batch, kv_head = batch_kv_head // num_kv_heads, batch_kv_head % num_kv_heads
    batch64, kv_head64 = batch.to(tl.int64), kv_head.to(tl.int64)
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    classes = tl.arange(0, BLOCK_C)
    key_code = tl.load(KeyCode + batch64 * seq_len + keys, mask=keys < seq_len, other=NOT_A_KEY)
    k = _load_tile(K + batch64 * stride_kb + kv_head64 * stride_kh, keys, dims, stride_kn, seq_len, head_dim)
    v = _load_tile(V + batch64 * stride_vb + kv_head64 * stride_vh, keys, dims_v, stride_vn, seq_len, value_dim)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Under causality only query blocks at or after this key block see it.
    first_row = (key_block * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for group_member in range(group_size):
        head64 = kv_head64 * group_size + group_member
        batch_head = batch64 * (num_kv_heads * group_size) + head64
        q_base = Q + batch64 * stride_qb + head64 * stride_qh
        for row_start in range(first_row, seq_len, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, rows, dims, stride_qn, seq_len, head_dim)
            lse_log2 = tl.load(LseLog2 + batch_head * seq_len + rows, mask=rows < seq_len, other=float("inf"))
            delta = tl.load(Delta + batch_head * seq_len + rows, mask=rows < seq_len, other=0.0)
            p = _probs(q, k, lse_log2, rows, keys, key_code, seq_len, scale_log2, CAUSAL, DOT_FP32)
            do = tl.zeros([BLOCK_M, BLOCK_DV], q.dtype)
            if HAS_OUT_GRAD:
                do = _load_tile(GradOut + batch64 * stride_gb + head64 * stride_gh, rows, dims_v, stride_gn,
                                seq_len, value_dim)
                grad_v += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32)
            grad_mass_rows = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
            block_has_mass = False
            if HAS_MASS_GRAD:
                slots = tl.load(RowSlot + batch64 * seq_len + rows, mask=rows < seq_len, other=-1)
                block_has_mass = tl.max(slots, 0) >= 0
                grad_mass_rows = _load_class_rows(GradMass + batch_head * num_slots * num_classes, slots, classes,
                                                  num_classes)
            ds = _grad_scores(p, do, v, delta, grad_mass_rows, key_code, classes, block_has_mass,
                              HAS_OUT_GRAD, HAS_MASS_GRAD, DOT_FP32)
            grad_k += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32)

    _store_tile(GradK + batch64 * stride_dkb + kv_head64 * stride_dkh, grad_k * scale, keys, dims, stride_dkn,
                seq_len, head_dim)
    if HAS_OUT_GRAD:
        _store_tile(GradV + batch64 * stride_dvb + kv_head64 * stride_dvh, grad_v, keys, dims_v, stride_dvn,
                    seq_len, value_dim)


@_autotune("backward")
@triton.jit
def label_attention_backward_dq_kernel(
    Q, K, V, GradOut, KeyCode, RowSlot, LseLog2, Delta, GradMass, GradQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn, stride_dqb, stride_dqh, stride_dqn,
    num_q_heads, group_size, seq_len, head_dim, value_dim, num_slots, num_classes, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one query head, looping over the key blocks it sees."""
    row_block, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // num_q_heads, batch_head % num_q_heads
    kv_head = head // group_size
    batch64, head64, kv_head64, batch_head64 = (batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64),
                                                batch_head.to(tl.int64))
    K += batch64 * stride_kb + kv_head64 * stride_kh
    V += batch64 * stride_vb + kv_head64 * stride_vh
    KeyCode += batch64 * seq_len

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    classes = tl.arange(0, BLOCK_C)
    q = _load_tile(Q + batch64 * stride_qb + head64 * stride_qh, rows, dims, stride_qn, seq_len, head_dim)
    lse_log2 = tl.load(LseLog2 + batch_head64 * seq_len + rows, mask=rows < seq_len, other=float("inf"))
    delta = tl.load(Delta + batch_head64 * seq_len + rows, mask=rows < seq_len, other=0.0)
    do = tl.zeros([BLOCK_M, BLOCK_DV], q.dtype)
    if HAS_OUT_GRAD:
        do = _load_tile(GradOut + batch64 * stride_gb + head64 * stride_gh, rows, dims_v, stride_gn, seq_len,
                        value_dim)
    grad_mass_rows = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    block_has_mass = False
    if HAS_MASS_GRAD:
        slots = tl.load(RowSlot + batch64 * seq_len + rows, mask=rows < seq_len, other=-1)
        block_has_mass = tl.max(slots, 0) >= 0
        grad_mass_rows = _load_class_rows(GradMass + batch_head64 * num_slots * num_classes, slots, classes,
                                          num_classes)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_start in range(0, _key_block_end(row_block * BLOCK_M, seq_len, BLOCK_M, CAUSAL), BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_code = tl.load(KeyCode + keys, mask=keys < seq_len, other=NOT_A_KEY)
        k = _load_tile(K, keys, dims, stride_kn, seq_len, head_dim)
        v = _load_tile(V, keys, dims_v, stride_vn, seq_len, value_dim)
        p = _probs(q, k, lse_log2, rows, keys, key_code, seq_len, scale_log2, CAUSAL, DOT_FP32)
        ds = _grad_scores(p, do, v, delta, grad_mass_rows, key_code, classes, block_has_mass,
                          HAS_OUT_GRAD, HAS_MASS_GRAD, DOT_FP32)
        grad_q += _dot(ds.to(k.dtype), k, DOT_FP32)
    _store_tile(GradQ + batch64 * stride_dqb + head64 * stride_dqh, grad_q * scale, rows, dims, stride_dqn,
                seq_len, head_dim)


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------
_DELTA_BLOCK_M = 32 if _INTERPRET else 64


def _strides(t: torch.Tensor):
    """(batch, head, row) strides of a [B, H, N, D] tensor whose last dim is contiguous."""
    return t.stride()[:3]


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_sizes(head_dim: int, value_dim: int, num_classes: int) -> dict:
    # tl.dot needs every dim >= 16; head dims like 80 or 96 are padded to a power of two and masked.
    return dict(BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_DV=max(16, triton.next_power_of_2(value_dim)),
                BLOCK_C=max(16, triton.next_power_of_2(num_classes)))


def _dot_fp32(dtype: torch.dtype) -> bool:
    return _INTERPRET or dtype == torch.float32


def _forward(q, k, v, sinks_log2, key_code, row_slot, num_slots, num_classes, causal, scale):
    batch, num_q_heads, seq_len, head_dim = q.shape
    value_dim = v.shape[-1]
    out = torch.empty((batch, num_q_heads, seq_len, value_dim), dtype=q.dtype, device=q.device)
    lse_log2 = torch.empty((batch, num_q_heads, seq_len), dtype=torch.float32, device=q.device)
    # Zeros: slots that no row maps to (empty or repeated query_rows entries) read back as mass 0.
    mass = torch.zeros((batch, num_q_heads, num_slots, num_classes), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_q_heads)  # noqa: E731
    label_attention_forward_kernel[grid](
        q, k, v, key_code, row_slot, sinks_log2, out, lse_log2, mass,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        num_q_heads, num_q_heads // k.shape[1], seq_len, head_dim, value_dim, num_slots, num_classes,
        scale * LOG2E, CAUSAL=causal, HAS_SINKS=sinks_log2 is not None, DOT_FP32=_dot_fp32(q.dtype),
        **_block_sizes(head_dim, value_dim, num_classes),
    )
    return out, lse_log2, mass


def _backward(q, k, v, out, lse_log2, mass, key_code, row_slot, num_classes, causal, scale, grad_out, grad_mass):
    """(dq, dk, dv or None, Delta float32 [B, Hq, N])."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    num_kv_heads, value_dim = k.shape[1], v.shape[-1]
    num_slots = mass.shape[2]
    has_out_grad, has_mass_grad = grad_out is not None, grad_mass is not None
    if has_out_grad:
        grad_out = _unit_last_stride(grad_out)
    if has_mass_grad:
        grad_mass = grad_mass.contiguous()
    grad_out_strides = _strides(grad_out) if has_out_grad else (0, 0, 0)
    blocks = _block_sizes(head_dim, value_dim, num_classes)
    flags = dict(HAS_OUT_GRAD=has_out_grad, HAS_MASS_GRAD=has_mass_grad)

    delta = torch.empty_like(lse_log2)
    label_attention_backward_delta_kernel[(triton.cdiv(seq_len, _DELTA_BLOCK_M), batch * num_q_heads)](
        out, grad_out, mass, grad_mass, row_slot, delta, *_strides(out), *grad_out_strides,
        num_q_heads, seq_len, value_dim, num_slots, num_classes, **flags, BLOCK_DV=blocks["BLOCK_DV"],
        BLOCK_C=blocks["BLOCK_C"], BLOCK_M=_DELTA_BLOCK_M,
    )

    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device) if has_out_grad else None
    common = dict(CAUSAL=causal, DOT_FP32=_dot_fp32(q.dtype), **flags, **blocks)
    group_size = num_q_heads // num_kv_heads
    label_attention_backward_dkdv_kernel[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * num_kv_heads)](
        q, k, v, grad_out, key_code, row_slot, lse_log2, delta, grad_mass, grad_k, grad_v,
        *_strides(q), *_strides(k), *_strides(v), *grad_out_strides, *_strides(grad_k),
        *(_strides(grad_v) if has_out_grad else (0, 0, 0)),
        num_kv_heads, group_size, seq_len, head_dim, value_dim, num_slots, num_classes, scale, scale * LOG2E,
        **common,
    )
    label_attention_backward_dq_kernel[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_q_heads)](
        q, k, v, grad_out, key_code, row_slot, lse_log2, delta, grad_mass, grad_q,
        *_strides(q), *_strides(k), *_strides(v), *grad_out_strides, *_strides(grad_q),
        num_q_heads, group_size, seq_len, head_dim, value_dim, num_slots, num_classes, scale, scale * LOG2E,
        **common,
    )
    return grad_q, grad_k, grad_v, delta


class TritonLabelAttentionFunction(torch.autograd.Function):
    """(q, k, v, sinks or None) -> (out [B,Hq,N,Dv], mass of every slot [B,Hq,S,C]). Saves q, k, v, out, lse_log2,
    mass, the sinks and the int32 key/row metadata: O(N) per head. A missing output gradient skips its share of the
    backward."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, key_code, row_slot, num_slots, num_classes, causal, scale):
        sinks_log2 = None if sinks is None else (sinks.float() * LOG2E).contiguous()
        out, lse_log2, mass = _forward(q, k, v, sinks_log2, key_code, row_slot, num_slots, num_classes, causal,
                                       scale)
        ctx.save_for_backward(q, k, v, out, lse_log2, mass, key_code, row_slot, sinks_log2)
        ctx.num_classes, ctx.causal, ctx.scale = num_classes, causal, scale
        ctx.sinks_dtype = None if sinks is None else sinks.dtype
        ctx.set_materialize_grads(False)
        return out, mass

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_mass):
        q, k, v, out, lse_log2, mass, key_code, row_slot, sinks_log2 = ctx.saved_tensors
        grad_q, grad_k, grad_v, delta = _backward(q, k, v, out, lse_log2, mass, key_code, row_slot, ctx.num_classes,
                                                  ctx.causal, ctx.scale, grad_out, grad_mass)
        grad_sinks = None
        if ctx.needs_input_grad[3]:  # dL/dsink = -sum over batch and rows of P_sink · Delta
            sink_probs = torch.exp2(sinks_log2[None, :, None] - lse_log2)
            grad_sinks = -(sink_probs * delta).sum((0, 2)).to(ctx.sinks_dtype)
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None, None, None, None


def unsupported(args: LabelAttentionArgs) -> Optional[str]:
    """Why the kernels cannot take these arguments, or None: CUDA tensors (CPU ones only under the interpreter),
    float16/bfloat16/float32, head dims D and Dv <= MAX_HEAD_DIM, num_classes <= MAX_NUM_CLASSES; sinks or not."""
    q = args.q
    if not (q.is_cuda or _INTERPRET):
        return (f"needs CUDA tensors, q is on {q.device} "
                "(set TRITON_INTERPRET=1 before importing triton to run it on CPU)")
    if q.dtype not in SUPPORTED_DTYPES:
        return f"supports q of dtype float16, bfloat16 or float32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"supports head dims up to {MAX_HEAD_DIM}, q has {q.shape[-1]}"
    if args.v.shape[-1] > MAX_HEAD_DIM:
        return f"supports head dims up to {MAX_HEAD_DIM}, v has {args.v.shape[-1]}"
    if args.num_classes > MAX_NUM_CLASSES:
        return f"supports num_classes up to {MAX_NUM_CLASSES}, got num_classes={args.num_classes}"
    return None


def _key_code(args: LabelAttentionArgs) -> torch.Tensor:
    """int32 [B, N]: class id, -1 for a real unlabelled key, NOT_A_KEY for padding."""
    code = args.key_class
    if args.key_padding_mask is not None:
        code = code.masked_fill(~args.key_padding_mask, NOT_A_KEY.value)
    return code.to(torch.int32).contiguous()


def _row_slots(args: LabelAttentionArgs):
    """(row_slot int32 [B, N], num_slots, slot_of_entry int64 [B, R] or None).

    Every selected row gets the slot of one of its query_rows entries (scatter keeps one of repeated
    entries); every entry then reads its row's slot. Empty entries (-1) point at a slot no row owns,
    which stays zero."""
    batch, _, seq_len, _ = args.q.shape
    device = args.q.device
    if args.query_rows is None:
        return torch.arange(seq_len, dtype=torch.int32, device=device).expand(batch, seq_len).contiguous(), \
            seq_len, None
    num_slots = args.query_rows.shape[1]
    # Column seq_len collects the empty entries so that they own no row.
    rows = torch.where(args.query_rows >= 0, args.query_rows, seq_len)
    slot_of_row = torch.full((batch, seq_len + 1), -1, dtype=torch.int64, device=device)
    slot_of_row.scatter_(1, rows, torch.arange(num_slots, device=device).expand(batch, num_slots))
    return slot_of_row[:, :seq_len].to(torch.int32).contiguous(), num_slots, slot_of_row.gather(1, rows)


@torch.compiler.disable
def label_attention(args: LabelAttentionArgs):
    """Backend entry point (arguments checked by unsupported()). torch.compile runs it as an opaque call (a graph
    break): dynamo does not trace Triton's interpreter or launcher, and the code around it still compiles."""
    row_slot, num_slots, slot_of_entry = _row_slots(args)
    q, k, v = (_unit_last_stride(t) for t in (args.q, args.k, args.v))
    out, mass = TritonLabelAttentionFunction.apply(q, k, v, args.sinks, _key_code(args), row_slot, num_slots,
                                                   args.num_classes, args.causal, args.scale)
    if slot_of_entry is None:
        return out, mass
    return out, gather_rows(mass, slot_of_entry)
