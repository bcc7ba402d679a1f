"""Backend "triton": one fused flash-attention kernel that also returns the per-class label masses.

Forward (docs/design.md §2): the usual online softmax over key blocks, plus a second accumulator
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

Loop structure (issue 25, as fast flash-attention kernels are built): a query block first visits the key blocks
that lie wholly before its first row (all of them without causality) with no causal and no bounds mask and
unmasked loads, then the blocks on the diagonal and the ragged last one with the full mask; blocks above the
diagonal are never loaded. The dK/dV kernel does the same from the key side: query blocks before the key block
are skipped, the diagonal and ragged ones masked, the rest unmasked. Padding is arbitrary per key, so the host
computes per (batch, key block) flags (_key_block_flags): a block of the unmasked stage that holds padding
masks its padded keys, a block without label keys skips the mass work. Head-dim loads are unmasked when D (Dv) is
a power of two >= 16 (EVEN_D, EVEN_DV).

Masses on the tensor cores (fp16/bf16 inputs): P·Y goes through _exact_dot, which splits P into three bf16 parts
and multiplies each by the one-hot Y (exact in bf16) with fp32 accumulation, which keeps fp32 accuracy; fp32 inputs
keep an IEEE fp32 dot. In the backward, G[row, class(key)] is selected class by class from G's rows (exact, no dot,
few registers). Both run only in query blocks that hold a selected row and key blocks that hold a label key. Under
TRITON_INTERPRET=1 every dot runs in fp32 (docs/design.md §6), on the same bf16 parts, so the split arithmetic is
exercised on CPU as well.

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

# The interpreter (CPU) mis-computes bf16 dots: it gets fp32 dots (of the same bf16-rounded operands where the GPU
# path rounds them, so the compensated mass arithmetic runs there too) and its own block sizes.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The kernels work in base 2 (exp2 is the fast path): scores are scaled by scale·log2(e), and the saved
# log-sum-exp lse_log2 is in those units.
LOG2E = 1.4426950408889634
NOT_A_KEY = tl.constexpr(-2)
# Per (batch, key block) flags, computed on the host for the launch's BLOCK_N (_key_block_flags).
BLOCK_HAS_NON_KEY = tl.constexpr(1)  # padding, or positions past the end of the sequence
BLOCK_HAS_LABEL = tl.constexpr(2)  # at least one key with a class


# ----------------------------------------------------------------------------------------------------
# Launch configs: (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) per kernel, GPU table, head-dim
# bucket (64 takes D <= 64) and precision ("half" = fp16/bf16 with tensor-core dots, "fp32" = fp32 inputs with
# IEEE fp32 dots). Table 90 serves compute capability 9.x and 10.x (227 KiB of shared memory per block), table
# 80 every other GPU, so its configs fit in 99 KiB (sm_86, sm_89, sm_120; an A100 has 163 KiB). In the forward and
# dQ kernels a program owns BLOCK_M query rows and loops over key blocks of BLOCK_N; in the dK/dV kernel a program
# owns BLOCK_N keys and loops over query blocks of BLOCK_M. Each entry is the first of a list of candidates, largest
# tiles first, that compiles for its target without spilling a register and within the shared memory
# (scripts/triton_static_report.py compiles every entry for sm_80 / sm_90a with Triton's ptxas, no GPU needed;
# output committed under benchmarks/results/triton-static/). Checked statically, not yet timed on a GPU: larger
# tiles (forward 128 x 64 at D = 128) spill a few bytes as the kernels stand.
# ----------------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    "forward": {
        90: {(64, "half"): (128, 64, 8, 3), (128, "half"): (64, 32, 8, 3), (256, "half"): (32, 16, 4, 2),
             (64, "fp32"): (64, 32, 8, 2), (128, "fp32"): (32, 16, 4, 2), (256, "fp32"): (16, 16, 4, 1)},
        80: {(64, "half"): (128, 64, 8, 2), (128, "half"): (64, 32, 8, 3), (256, "half"): (32, 16, 4, 2),
             (64, "fp32"): (64, 32, 8, 2), (128, "fp32"): (64, 32, 8, 2), (256, "fp32"): (32, 16, 4, 2)},
    },
    "dkdv": {
        90: {(64, "half"): (64, 64, 8, 2), (128, "half"): (32, 64, 8, 3), (256, "half"): (16, 32, 4, 2),
             (64, "fp32"): (16, 32, 4, 1), (128, "fp32"): (16, 16, 4, 1), (256, "fp32"): (16, 16, 4, 1)},
        80: {(64, "half"): (32, 32, 4, 2), (128, "half"): (16, 32, 4, 2), (256, "half"): (16, 16, 4, 1),
             (64, "fp32"): (16, 32, 4, 1), (128, "fp32"): (16, 16, 4, 1), (256, "fp32"): (16, 16, 4, 1)},
    },
    "dq": {
        90: {(64, "half"): (128, 64, 8, 2), (128, "half"): (64, 32, 8, 3), (256, "half"): (32, 16, 4, 2),
             (64, "fp32"): (64, 32, 8, 2), (128, "fp32"): (64, 32, 8, 2), (256, "fp32"): (32, 16, 4, 2)},
        80: {(64, "half"): (128, 64, 8, 2), (128, "half"): (64, 64, 8, 3), (256, "half"): (64, 32, 8, 3),
             (64, "fp32"): (64, 32, 8, 2), (128, "fp32"): (32, 16, 4, 2), (256, "fp32"): (32, 16, 4, 2)},
    },
}
# Under the interpreter every step costs Python overhead, so blocks are large; BLOCK_M != BLOCK_N so that
# the tests cover the block-boundary arithmetic between query and key blocks (a test swaps them).
_INTERPRETER_BLOCKS = {"forward": (64, 32), "dkdv": (32, 64), "dq": (32, 64)}


def gpu_table(capability: tuple) -> int:
    """The config table of a GPU of compute capability (major, minor): 90 for 9.x and 10.x, else 80."""
    return 90 if capability[0] in (9, 10) else 80


def head_dim_bucket(head_dim: int, value_dim: int) -> int:
    """The table's head-dim bucket of a launch: the padded width of the wider of q/k's and v's head dims."""
    return max(64, triton.next_power_of_2(max(head_dim, value_dim)))


def precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def launch_config(kind: str, q: torch.Tensor, value_dim: int) -> dict:
    """BLOCK_M, BLOCK_N, num_warps and num_stages of kernel `kind` ("forward", "dkdv", "dq") for q's GPU, head dims
    and dtype (the interpreter's fixed blocks under TRITON_INTERPRET=1)."""
    if _INTERPRET:
        block_m, block_n = _INTERPRETER_BLOCKS[kind]
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    table = _GPU_CONFIGS[kind][gpu_table(torch.cuda.get_device_capability(q.device))]
    block_m, block_n, warps, stages = table[head_dim_bucket(q.shape[-1], value_dim), precision(q.dtype)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b accumulated in fp32. FP32 also runs the products in full fp32 (fp32 inputs and the interpreter);
    otherwise the operands stay in fp16/bf16 for the tensor cores."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _exact_dot(a, one_hot, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr):
    """a @ one_hot to fp32 accuracy, for fp32 `a` and a 0/1 matrix `one_hot` (the masses P·Y).

    SPLIT (fp16/bf16 inputs): a = hi + mid + lo, three bf16 parts (each the bf16 rounding of what the parts before
    it left; bf16 has fp32's exponent range, so no part under- or overflows where fp32 does not), each multiplied
    by the one-hot in bf16 (exact) with fp32 accumulation: three tensor-core dots that keep 24 of a's significant
    bits, fp32's own precision. Without SPLIT (fp32 inputs): one IEEE fp32 dot."""
    if SPLIT:
        y = one_hot.to(tl.bfloat16)
        hi = a.to(tl.bfloat16)
        rest = a - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        return _dot(lo, y, DOT_FP32) + _dot(mid, y, DOT_FP32) + _dot(hi, y, DOT_FP32)
    return tl.dot(a, one_hot.to(tl.float32), input_precision="ieee")


@triton.jit
def _load_tile(base, rows, dims, stride_row, seq_len, head_dim, MASK_ROWS: tl.constexpr, MASK_DIMS: tl.constexpr):
    """[len(rows), len(dims)] tile; rows past seq_len (MASK_ROWS) and dims past head_dim (MASK_DIMS) load as 0.
    Unmasked loads are for full blocks and head dims that are powers of two."""
    pointers = base + rows[:, None] * stride_row + dims[None, :]
    if MASK_ROWS:
        if MASK_DIMS:
            return tl.load(pointers, mask=(rows[:, None] < seq_len) & (dims[None, :] < head_dim), other=0.0)
        return tl.load(pointers, mask=rows[:, None] < seq_len, other=0.0)
    if MASK_DIMS:
        return tl.load(pointers, mask=dims[None, :] < head_dim, other=0.0)
    return tl.load(pointers)


@triton.jit
def _load_rows(base, rows, seq_len, other, MASK_ROWS: tl.constexpr):
    """base[rows] of a per-row vector; rows past seq_len give `other` (MASK_ROWS)."""
    if MASK_ROWS:
        return tl.load(base + rows, mask=rows < seq_len, other=other)
    return tl.load(base + rows)


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
def _key_ranges(row_start, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_end, end) for the query block [row_start, row_start + BLOCK_M): the key blocks that start before
    full_end are inside the sequence and, under causality, wholly before the block's first row, so every row sees
    every key of them and they need no causal or bounds mask; blocks from full_end to end hold the diagonal and
    the ragged end. Key blocks above the diagonal (from row_start + BLOCK_M on) are never visited."""
    if CAUSAL:
        return row_start // BLOCK_N * BLOCK_N, tl.minimum(seq_len, row_start + BLOCK_M)
    return seq_len // BLOCK_N * BLOCK_N, seq_len


@triton.jit
def _row_ranges(key_start, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(first, full_start, full_end) for the key block [key_start, key_start + BLOCK_N): the query blocks from
    first on see some of its keys (under causality, the earlier ones see none: they are skipped); those in
    [full_start, full_end) are inside the sequence and see every one of its keys (no causal or bounds mask); the
    others, [first, full_start) on the diagonal and [full_end, seq_len) the ragged end, are masked."""
    full_end = seq_len // BLOCK_M * BLOCK_M
    if CAUSAL:
        first = key_start // BLOCK_M * BLOCK_M
        return first, tl.minimum(tl.cdiv(key_start + BLOCK_N, BLOCK_M) * BLOCK_M, full_end), full_end
    return 0, 0, full_end


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _forward_key_block(acc, mass_acc, row_sum, row_max, q, K, V, KeyCode, BlockFlags, key_start, rows, dims,
                       dims_v, classes, block_has_mass, stride_kn, stride_vn, seq_len, head_dim, value_dim,
                       scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                       EVEN_DV: tl.constexpr, DOT_FP32: tl.constexpr, MASS_SPLIT: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """One step of the online softmax over the key block at key_start. MASKED: causal, bounds and padding masks
    (diagonal and ragged blocks); otherwise only a block flagged as holding padding masks its padded keys."""
    keys = key_start + tl.arange(0, BLOCK_N)
    flags = tl.load(BlockFlags + key_start // BLOCK_N)
    k = _load_tile(K, keys, dims, stride_kn, seq_len, head_dim, MASKED, not EVEN_D)
    v = _load_tile(V, keys, dims_v, stride_vn, seq_len, value_dim, MASKED, not EVEN_DV)
    scores = _dot(q, tl.trans(k), DOT_FP32) * scale_log2
    if MASKED:
        key_code = tl.load(KeyCode + keys, mask=keys < seq_len, other=NOT_A_KEY)
        scores = tl.where(_visible(rows, keys, key_code, seq_len, CAUSAL), scores, float("-inf"))
    elif (flags & BLOCK_HAS_NON_KEY) != 0:
        key_code = tl.load(KeyCode + keys)
        scores = tl.where(key_code[None, :] != NOT_A_KEY, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    # A row that has seen no key yet keeps max -inf; shift by 0 then so that P = 0, not NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(scores - shift[:, None])
    alpha = tl.exp2(row_max - shift)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    if block_has_mass:  # uniform per program: query blocks without selected rows skip the mass work
        mass_acc = mass_acc * alpha[:, None]
        if (flags & BLOCK_HAS_LABEL) != 0:  # most key blocks of a prompt hold no label key
            key_code = tl.load(KeyCode + keys, mask=keys < seq_len, other=NOT_A_KEY)
            mass_acc += _exact_dot(p, _one_hot(key_code, classes), MASS_SPLIT, DOT_FP32)
    return acc, mass_acc, row_sum, new_max


@triton.jit
def label_attention_forward_kernel(
    Q, K, V, KeyCode, BlockFlags, RowSlot, SinksLog2, Out, LseLog2, Mass,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    num_q_heads, group_size, seq_len, num_key_blocks, head_dim, value_dim, num_slots, num_classes, scale_log2,
    CAUSAL: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_FP32: tl.constexpr, MASS_SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Out, lse_log2 and the masses of one query block of one query head: the key blocks wholly before the block
    first, without masks, then the diagonal and ragged ones with them."""
    row_block, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // num_q_heads, batch_head % num_q_heads
    kv_head = head // group_size  # GQA by index arithmetic: K/V are never repeated
    batch64, head64, kv_head64 = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    K += batch64 * stride_kb + kv_head64 * stride_kh
    V += batch64 * stride_vb + kv_head64 * stride_vh
    KeyCode += batch64 * seq_len
    BlockFlags += batch64 * num_key_blocks

    row_start = row_block * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    classes = tl.arange(0, BLOCK_C)
    q = _load_tile(Q + batch64 * stride_qb + head64 * stride_qh, rows, dims, stride_qn, seq_len, head_dim, True,
                   not EVEN_D)
    slots = tl.load(RowSlot + batch64 * seq_len + rows, mask=rows < seq_len, other=-1)
    block_has_mass = tl.max(slots, 0) >= 0

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the sink is one more logit of every row: it starts the running max and sum
        row_max = tl.zeros([BLOCK_M], tl.float32) + tl.load(SinksLog2 + head)
        row_sum = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    mass_acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    full_end, end = _key_ranges(row_start, seq_len, BLOCK_M, BLOCK_N, CAUSAL)
    for key_start in range(0, full_end, BLOCK_N):
        acc, mass_acc, row_sum, row_max = _forward_key_block(
            acc, mass_acc, row_sum, row_max, q, K, V, KeyCode, BlockFlags, key_start, rows, dims, dims_v, classes,
            block_has_mass, stride_kn, stride_vn, seq_len, head_dim, value_dim, scale_log2, False, CAUSAL, EVEN_D,
            EVEN_DV, DOT_FP32, MASS_SPLIT, BLOCK_N)
    for key_start in range(full_end, end, BLOCK_N):
        acc, mass_acc, row_sum, row_max = _forward_key_block(
            acc, mass_acc, row_sum, row_max, q, K, V, KeyCode, BlockFlags, key_start, rows, dims, dims_v, classes,
            block_has_mass, stride_kn, stride_vn, seq_len, head_dim, value_dim, scale_log2, True, CAUSAL, EVEN_D,
            EVEN_DV, DOT_FP32, MASS_SPLIT, BLOCK_N)

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
                         rows, dims_v, stride_on, seq_len, value_dim, True, True)
        grad_out = _load_tile(GradOut + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh,
                              rows, dims_v, stride_gn, seq_len, value_dim, True, True)
        delta += tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    if HAS_MASS_GRAD:
        classes = tl.arange(0, BLOCK_C)
        slots = tl.load(RowSlot + batch.to(tl.int64) * seq_len + rows, mask=rows < seq_len, other=-1)
        offset = batch_head.to(tl.int64) * num_slots * num_classes
        mass = _load_class_rows(Mass + offset, slots, classes, num_classes)
        grad_mass = _load_class_rows(GradMass + offset, slots, classes, num_classes)
        delta += tl.sum(mass * grad_mass, 1)
    tl.store(Delta + batch_head.to(tl.int64) * seq_len + rows, delta, mask=rows < seq_len)


@triton.jit
def _grad_scores(p, dp, delta, GradMassBase, slots, key_code, has_mass, num_classes, HAS_MASS_GRAD: tl.constexpr):
    """dS = P * (dP - Delta) with dP = dO·Vᵀ (given) + G[row, class(key)] (docs/design.md §2). The class term is selected
    class by class from G's rows of the tile (exact, no dot, few registers; ICL prompts have a handful of classes);
    has_mass: the tile has a selected row and a label key (uniform per program, else the term is zero and
    skipped)."""
    if HAS_MASS_GRAD:
        if has_mass:
            for c in range(num_classes):
                grad_mass = tl.load(GradMassBase + slots * num_classes + c, mask=slots >= 0, other=0.0)
                dp += tl.where(key_code[None, :] == c, grad_mass[:, None], 0.0)
    return p * (dp - delta[:, None])


@triton.jit
def _dkdv_query_block(grad_k, grad_v, k, v, key_code, keys, has_padding, has_label, q_base, GradOutBase,
                      LseLog2Base, DeltaBase, GradMassBase, RowSlotBase, row_start, dims, dims_v, stride_qn,
                      stride_gn, seq_len, head_dim, value_dim, num_classes, scale_log2,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_OUT_GRAD: tl.constexpr,
                      HAS_MASS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
                      EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """The contribution of the query block at row_start (of one query head) to dK and dV of the program's keys.
    MASKED: causal, bounds and padding masks; otherwise only padded keys are masked, when the block has any."""
    rows = row_start + tl.arange(0, BLOCK_M)
    q = _load_tile(q_base, rows, dims, stride_qn, seq_len, head_dim, MASKED, not EVEN_D)
    lse_log2 = _load_rows(LseLog2Base, rows, seq_len, float("inf"), MASKED)
    delta = _load_rows(DeltaBase, rows, seq_len, 0.0, MASKED)
    p = tl.exp2(_dot(q, tl.trans(k), DOT_FP32) * scale_log2 - lse_log2[:, None])
    if MASKED:
        p = tl.where(_visible(rows, keys, key_code, seq_len, CAUSAL), p, 0.0)
    elif has_padding:
        p = tl.where(key_code[None, :] != NOT_A_KEY, p, 0.0)
    dp = tl.zeros_like(p)
    if HAS_OUT_GRAD:
        do = _load_tile(GradOutBase, rows, dims_v, stride_gn, seq_len, value_dim, MASKED, not EVEN_DV)
        grad_v += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32)
        dp += _dot(do, tl.trans(v), DOT_FP32)
    slots = tl.full([BLOCK_M], -1, tl.int32)
    has_mass = False
    if HAS_MASS_GRAD:
        slots = _load_rows(RowSlotBase, rows, seq_len, -1, MASKED)
        has_mass = has_label & (tl.max(slots, 0) >= 0)
    ds = _grad_scores(p, dp, delta, GradMassBase, slots, key_code, has_mass, num_classes, HAS_MASS_GRAD)
    grad_k += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32)
    return grad_k, grad_v


@triton.jit
def label_attention_backward_dkdv_kernel(
    Q, K, V, GradOut, KeyCode, BlockFlags, RowSlot, LseLog2, Delta, GradMass, GradK, GradV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    num_kv_heads, group_size, seq_len, num_key_blocks, head_dim, value_dim, num_slots, num_classes, scale,
    scale_log2, CAUSAL: tl.constexpr, HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one KV head. The program loops over every query head of the GQA group (K and V
    are loaded once for all of them) and over the query blocks that see these keys: under causality the earlier
    ones are skipped, the diagonal ones masked, the later ones run without masks. Each dK/dV element is written
    once: no atomics."""
    key_block, batch_kv_head = tl.program_id(0), tl.program_id(1)
    batch, kv_head = batch_kv_head // num_kv_heads, batch_kv_head % num_kv_heads
    batch64, kv_head64 = batch.to(tl.int64), kv_head.to(tl.int64)
    key_start = key_block * BLOCK_N
    keys = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    key_code = tl.load(KeyCode + batch64 * seq_len + keys, mask=keys < seq_len, other=NOT_A_KEY)
    flags = tl.load(BlockFlags + batch64 * num_key_blocks + key_block)
    has_padding = (flags & BLOCK_HAS_NON_KEY) != 0
    has_label = (flags & BLOCK_HAS_LABEL) != 0
    k = _load_tile(K + batch64 * stride_kb + kv_head64 * stride_kh, keys, dims, stride_kn, seq_len, head_dim, True,
                   not EVEN_D)
    v = _load_tile(V + batch64 * stride_vb + kv_head64 * stride_vh, keys, dims_v, stride_vn, seq_len, value_dim,
                   True, not EVEN_DV)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first, full_start, full_end = _row_ranges(key_start, seq_len, BLOCK_M, BLOCK_N, CAUSAL)
    for group_member in range(group_size):
        head64 = kv_head64 * group_size + group_member
        batch_head = batch64 * (num_kv_heads * group_size) + head64
        q_base = Q + batch64 * stride_qb + head64 * stride_qh
        lse_base = LseLog2 + batch_head * seq_len
        delta_base = Delta + batch_head * seq_len
        grad_out_base = GradOut  # None without an output gradient
        if HAS_OUT_GRAD:
            grad_out_base += batch64 * stride_gb + head64 * stride_gh
        grad_mass_base = GradMass  # None without a mass gradient
        if HAS_MASS_GRAD:
            grad_mass_base += batch_head * num_slots * num_classes
        row_slot_base = RowSlot + batch64 * seq_len
        for row_start in range(first, full_start, BLOCK_M):  # the diagonal
            grad_k, grad_v = _dkdv_query_block(
                grad_k, grad_v, k, v, key_code, keys, has_padding, has_label, q_base, grad_out_base,
                lse_base, delta_base, grad_mass_base, row_slot_base, row_start, dims, dims_v, stride_qn,
                stride_gn, seq_len, head_dim, value_dim, num_classes, scale_log2, True, CAUSAL, HAS_OUT_GRAD,
                HAS_MASS_GRAD, DOT_FP32, EVEN_D, EVEN_DV, BLOCK_M)
        for row_start in range(full_start, full_end, BLOCK_M):  # every row sees every key
            grad_k, grad_v = _dkdv_query_block(
                grad_k, grad_v, k, v, key_code, keys, has_padding, has_label, q_base, grad_out_base,
                lse_base, delta_base, grad_mass_base, row_slot_base, row_start, dims, dims_v, stride_qn,
                stride_gn, seq_len, head_dim, value_dim, num_classes, scale_log2, False, CAUSAL, HAS_OUT_GRAD,
                HAS_MASS_GRAD, DOT_FP32, EVEN_D, EVEN_DV, BLOCK_M)
        for row_start in range(tl.maximum(first, full_end), seq_len, BLOCK_M):  # the ragged last query block
            grad_k, grad_v = _dkdv_query_block(
                grad_k, grad_v, k, v, key_code, keys, has_padding, has_label, q_base, grad_out_base,
                lse_base, delta_base, grad_mass_base, row_slot_base, row_start, dims, dims_v, stride_qn,
                stride_gn, seq_len, head_dim, value_dim, num_classes, scale_log2, True, CAUSAL, HAS_OUT_GRAD,
                HAS_MASS_GRAD, DOT_FP32, EVEN_D, EVEN_DV, BLOCK_M)

    _store_tile(GradK + batch64 * stride_dkb + kv_head64 * stride_dkh, grad_k * scale, keys, dims, stride_dkn,
                seq_len, head_dim)
    if HAS_OUT_GRAD:
        _store_tile(GradV + batch64 * stride_dvb + kv_head64 * stride_dvh, grad_v, keys, dims_v, stride_dvn,
                    seq_len, value_dim)


@triton.jit
def _dq_key_block(grad_q, q, do, lse_log2, delta, GradMass, slots, block_has_mass, K, V, KeyCode, BlockFlags,
                  key_start, rows, dims, dims_v, num_classes, stride_kn, stride_vn, seq_len, head_dim, value_dim,
                  scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_OUT_GRAD: tl.constexpr,
                  HAS_MASS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
                  EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """The contribution of the key block at key_start to dQ of the program's query block (masks as in the
    forward)."""
    keys = key_start + tl.arange(0, BLOCK_N)
    flags = tl.load(BlockFlags + key_start // BLOCK_N)
    k = _load_tile(K, keys, dims, stride_kn, seq_len, head_dim, MASKED, not EVEN_D)
    p = tl.exp2(_dot(q, tl.trans(k), DOT_FP32) * scale_log2 - lse_log2[:, None])
    if MASKED:
        key_code = tl.load(KeyCode + keys, mask=keys < seq_len, other=NOT_A_KEY)
        p = tl.where(_visible(rows, keys, key_code, seq_len, CAUSAL), p, 0.0)
    elif (flags & BLOCK_HAS_NON_KEY) != 0:
        key_code = tl.load(KeyCode + keys)
        p = tl.where(key_code[None, :] != NOT_A_KEY, p, 0.0)
    dp = tl.zeros_like(p)
    if HAS_OUT_GRAD:
        v = _load_tile(V, keys, dims_v, stride_vn, seq_len, value_dim, MASKED, not EVEN_DV)
        dp += _dot(do, tl.trans(v), DOT_FP32)
    key_code = tl.zeros([BLOCK_N], tl.int32) - 1
    has_mass = False
    if HAS_MASS_GRAD:
        has_mass = block_has_mass & ((flags & BLOCK_HAS_LABEL) != 0)
        if has_mass:
            key_code = tl.load(KeyCode + keys, mask=keys < seq_len, other=NOT_A_KEY)
    ds = _grad_scores(p, dp, delta, GradMass, slots, key_code, has_mass, num_classes, HAS_MASS_GRAD)
    return grad_q + _dot(ds.to(k.dtype), k, DOT_FP32)


@triton.jit
def label_attention_backward_dq_kernel(
    Q, K, V, GradOut, KeyCode, BlockFlags, RowSlot, LseLog2, Delta, GradMass, GradQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn, stride_dqb, stride_dqh, stride_dqn,
    num_q_heads, group_size, seq_len, num_key_blocks, head_dim, value_dim, num_slots, num_classes, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one query head: the key blocks wholly before it without masks, then the diagonal
    and ragged ones with them (as in the forward)."""
    row_block, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // num_q_heads, batch_head % num_q_heads
    kv_head = head // group_size
    batch64, head64, kv_head64, batch_head64 = (batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64),
                                                batch_head.to(tl.int64))
    K += batch64 * stride_kb + kv_head64 * stride_kh
    V += batch64 * stride_vb + kv_head64 * stride_vh
    KeyCode += batch64 * seq_len
    BlockFlags += batch64 * num_key_blocks

    row_start = row_block * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + batch64 * stride_qb + head64 * stride_qh, rows, dims, stride_qn, seq_len, head_dim, True,
                   not EVEN_D)
    lse_log2 = tl.load(LseLog2 + batch_head64 * seq_len + rows, mask=rows < seq_len, other=float("inf"))
    delta = tl.load(Delta + batch_head64 * seq_len + rows, mask=rows < seq_len, other=0.0)
    do = tl.zeros([BLOCK_M, BLOCK_DV], q.dtype)
    if HAS_OUT_GRAD:
        do = _load_tile(GradOut + batch64 * stride_gb + head64 * stride_gh, rows, dims_v, stride_gn, seq_len,
                        value_dim, True, not EVEN_DV)
    slots = tl.load(RowSlot + batch64 * seq_len + rows, mask=rows < seq_len, other=-1)
    block_has_mass = False
    if HAS_MASS_GRAD:
        block_has_mass = tl.max(slots, 0) >= 0
        GradMass += batch_head64 * num_slots * num_classes

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, end = _key_ranges(row_start, seq_len, BLOCK_M, BLOCK_N, CAUSAL)
    for key_start in range(0, full_end, BLOCK_N):
        grad_q = _dq_key_block(grad_q, q, do, lse_log2, delta, GradMass, slots, block_has_mass, K, V, KeyCode,
                               BlockFlags, key_start, rows, dims, dims_v, num_classes, stride_kn, stride_vn, seq_len,
                               head_dim, value_dim, scale_log2, False, CAUSAL, HAS_OUT_GRAD, HAS_MASS_GRAD,
                               DOT_FP32, EVEN_D, EVEN_DV, BLOCK_N)
    for key_start in range(full_end, end, BLOCK_N):
        grad_q = _dq_key_block(grad_q, q, do, lse_log2, delta, GradMass, slots, block_has_mass, K, V, KeyCode,
                               BlockFlags, key_start, rows, dims, dims_v, num_classes, stride_kn, stride_vn, seq_len,
                               head_dim, value_dim, scale_log2, True, CAUSAL, HAS_OUT_GRAD, HAS_MASS_GRAD,
                               DOT_FP32, EVEN_D, EVEN_DV, BLOCK_N)
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
    # tl.dot needs every dim >= 16; head dims like 80 or 96 are padded to a power of two and masked (EVEN_D False).
    block_d, block_dv = max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(value_dim))
    return dict(BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_C=max(16, triton.next_power_of_2(num_classes)),
                EVEN_D=block_d == head_dim, EVEN_DV=block_dv == value_dim)


def _precision_flags(dtype: torch.dtype) -> dict:
    """DOT_FP32: every dot in IEEE fp32 (fp32 inputs, and the interpreter). MASS_SPLIT: the masses' dots as three
    bf16 parts (fp16/bf16 inputs; under the interpreter those parts are multiplied in fp32, which is exact)."""
    return dict(DOT_FP32=_INTERPRET or dtype == torch.float32, MASS_SPLIT=dtype != torch.float32)


def _key_block_flags(key_code: torch.Tensor, block_n: int) -> torch.Tensor:
    """int32 [B, cdiv(N, block_n)]: per key block, BLOCK_HAS_NON_KEY if it holds padding or runs past the end of
    the sequence, plus BLOCK_HAS_LABEL if it holds a key with a class."""
    batch, seq_len = key_code.shape
    num_blocks = triton.cdiv(seq_len, block_n)
    blocks = torch.nn.functional.pad(key_code, (0, num_blocks * block_n - seq_len), value=NOT_A_KEY.value)
    blocks = blocks.view(batch, num_blocks, block_n)
    flags = (blocks == NOT_A_KEY.value).any(-1).to(torch.int32) * BLOCK_HAS_NON_KEY.value
    flags += (blocks >= 0).any(-1).to(torch.int32) * BLOCK_HAS_LABEL.value
    return flags.contiguous()


def _forward(q, k, v, sinks_log2, key_code, row_slot, num_slots, num_classes, causal, scale):
    batch, num_q_heads, seq_len, head_dim = q.shape
    value_dim = v.shape[-1]
    out = torch.empty((batch, num_q_heads, seq_len, value_dim), dtype=q.dtype, device=q.device)
    lse_log2 = torch.empty((batch, num_q_heads, seq_len), dtype=torch.float32, device=q.device)
    # Zeros: slots that no row maps to (empty or repeated query_rows entries) read back as mass 0.
    mass = torch.zeros((batch, num_q_heads, num_slots, num_classes), dtype=torch.float32, device=q.device)
    config = launch_config("forward", q, value_dim)
    block_flags = _key_block_flags(key_code, config["BLOCK_N"])
    label_attention_forward_kernel[(triton.cdiv(seq_len, config["BLOCK_M"]), batch * num_q_heads)](
        q, k, v, key_code, block_flags, row_slot, sinks_log2, out, lse_log2, mass,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        num_q_heads, num_q_heads // k.shape[1], seq_len, block_flags.shape[1], head_dim, value_dim, num_slots,
        num_classes, scale * LOG2E, CAUSAL=causal, HAS_SINKS=sinks_log2 is not None, **_precision_flags(q.dtype),
        **_block_sizes(head_dim, value_dim, num_classes), **config,
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
    common = dict(CAUSAL=causal, DOT_FP32=_precision_flags(q.dtype)["DOT_FP32"], **flags,
                  **{name: value for name, value in blocks.items() if name != "BLOCK_C"})
    group_size = num_q_heads // num_kv_heads
    config = launch_config("dkdv", q, value_dim)
    block_flags = _key_block_flags(key_code, config["BLOCK_N"])
    label_attention_backward_dkdv_kernel[(block_flags.shape[1], batch * num_kv_heads)](
        q, k, v, grad_out, key_code, block_flags, row_slot, lse_log2, delta, grad_mass, grad_k, grad_v,
        *_strides(q), *_strides(k), *_strides(v), *grad_out_strides, *_strides(grad_k),
        *(_strides(grad_v) if has_out_grad else (0, 0, 0)),
        num_kv_heads, group_size, seq_len, block_flags.shape[1], head_dim, value_dim, num_slots, num_classes, scale,
        scale * LOG2E, **common, **config,
    )
    config = launch_config("dq", q, value_dim)
    block_flags = _key_block_flags(key_code, config["BLOCK_N"])
    label_attention_backward_dq_kernel[(triton.cdiv(seq_len, config["BLOCK_M"]), batch * num_q_heads)](
        q, k, v, grad_out, key_code, block_flags, row_slot, lse_log2, delta, grad_mass, grad_q,
        *_strides(q), *_strides(k), *_strides(v), *grad_out_strides, *_strides(grad_q),
        num_q_heads, group_size, seq_len, block_flags.shape[1], head_dim, value_dim, num_slots, num_classes, scale,
        scale * LOG2E, **common, **config,
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
def fused_label_attention(args: LabelAttentionArgs):
    """Backend entry point (arguments checked by unsupported()). torch.compile runs it as an opaque call (a graph
    break): dynamo does not trace Triton's interpreter or launcher, and the code around it still compiles."""
    row_slot, num_slots, slot_of_entry = _row_slots(args)
    q, k, v = (_unit_last_stride(t) for t in (args.q, args.k, args.v))
    out, mass = TritonLabelAttentionFunction.apply(q, k, v, args.sinks, _key_code(args), row_slot, num_slots,
                                                   args.num_classes, args.causal, args.scale)
    if slot_of_entry is None:
        return out, mass
    return out, gather_rows(mass, slot_of_entry)
