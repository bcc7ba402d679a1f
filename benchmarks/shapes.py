"""Kernel-level problems: the attention of a many-demonstration ICL prompt, as label_attention sees it.

A prompt of N tokens holds k = (N - 1) // demo_len demonstrations of demo_len tokens each; the label
token of demonstration i sits at (i + 1) * demo_len - 2 (a newline follows it) and has class i % C.
The query is the last token. The rows that carry a mass are one of:
  "last"  R = 1, the query token (ABFT as published);
  "demos" R = k, the token before each label (every demonstration trained as a query);
  "all"   R = N (query_rows=None).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

ROW_SETS = ("last", "demos", "all")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

FULL_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
FULL_HEADS = (32, 8, 128)  # Hq, Hkv, D of Llama-3-8B
FULL_TOKENS_PER_BATCH = 16384  # batch = max(1, this // N), so every N does about the same work per row
QUICK_SEQ_LENS = (128, 256)
QUICK_HEADS = (4, 2, 32)


@dataclass(frozen=True)
class KernelShape:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    rows: str  # one of ROW_SETS
    dtype: str  # a key of DTYPES
    num_classes: int = 4
    demo_len: int = 64

    @property
    def num_demos(self) -> int:
        return (self.seq_len - 1) // self.demo_len

    @property
    def num_rows(self) -> int:
        return {"last": 1, "demos": self.num_demos, "all": self.seq_len}[self.rows]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def attention_flops(self, backward: bool) -> float:
        """The usual causal attention count: 4·B·H·N²·D / 2 forward, 3.5 times that for forward + backward."""
        forward = 4 * self.batch * self.heads * self.seq_len ** 2 * self.head_dim / 2
        return forward * (3.5 if backward else 1.0)

    def describe(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "seq_len": self.seq_len, "rows": self.rows, "num_rows": self.num_rows, "dtype": self.dtype,
                "num_classes": self.num_classes, "num_demos": self.num_demos, "demo_len": self.demo_len}


@dataclass
class KernelProblem:
    """Inputs of one label_attention call, on the device, in the shape's dtype."""

    shape: KernelShape
    q: torch.Tensor  # [B, Hq, N, D]
    k: torch.Tensor  # [B, Hkv, N, D]
    v: torch.Tensor  # [B, Hkv, N, D]
    key_class: torch.Tensor  # int64 [B, N], -1 = not a label
    query_rows: Optional[torch.Tensor]  # int64 [B, R], None = every row

    @property
    def num_classes(self) -> int:
        return self.shape.num_classes

    @property
    def row_positions(self) -> torch.Tensor:
        """int64 [B, R]: the positions of the rows that carry a mass (all of them when query_rows is None)."""
        if self.query_rows is not None:
            return self.query_rows
        return torch.arange(self.shape.seq_len, device=self.q.device).expand(self.shape.batch, -1)


def label_positions(seq_len: int, demo_len: int) -> torch.Tensor:
    """The label token of each demonstration of a seq_len-token prompt (see the module docstring)."""
    return torch.arange(1, (seq_len - 1) // demo_len + 1) * demo_len - 2


def make_problem(shape: KernelShape, device: torch.device, requires_grad: bool = False,
                 seed: int = 0) -> KernelProblem:
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(heads: int) -> torch.Tensor:
        x = torch.randn(shape.batch, heads, shape.seq_len, shape.head_dim, generator=gen, device=device,
                        dtype=shape.torch_dtype)
        return x.requires_grad_(requires_grad)

    labels = label_positions(shape.seq_len, shape.demo_len)
    key_class = torch.full((shape.batch, shape.seq_len), -1, dtype=torch.long)
    key_class[:, labels] = torch.arange(len(labels)) % shape.num_classes
    rows = {"last": torch.tensor([shape.seq_len - 1]), "demos": labels - 1, "all": None}[shape.rows]
    query_rows = None if rows is None else rows.expand(shape.batch, -1).to(device)
    return KernelProblem(shape, randn(shape.heads), randn(shape.kv_heads), randn(shape.kv_heads),
                         key_class.to(device), query_rows)


def kernel_shapes(quick: bool, dtypes=None, seq_lens=None, rows=ROW_SETS, heads=None, batch=None) -> list:
    """The sweep: every (dtype, N, rows) for the full or the quick (CPU) set of sizes. heads = (Hq, Hkv, D)
    and batch (default: 1 in quick mode, else FULL_TOKENS_PER_BATCH // N) override the defaults."""
    if quick:
        heads, kv_heads, head_dim = heads or QUICK_HEADS
        dtypes, seq_lens, demo_len = dtypes or ("bfloat16",), seq_lens or QUICK_SEQ_LENS, 32
    else:
        heads, kv_heads, head_dim = heads or FULL_HEADS
        dtypes, seq_lens, demo_len = dtypes or ("float16", "bfloat16"), seq_lens or FULL_SEQ_LENS, 64
    if heads % kv_heads:
        raise ValueError(f"Hq={heads} must be a multiple of Hkv={kv_heads}")
    if min(seq_lens) <= demo_len:
        raise ValueError(f"sequence lengths must exceed the demonstration length {demo_len}, got {min(seq_lens)}")
    shapes = []
    for dtype in dtypes:
        for seq_len in seq_lens:
            size = batch or (1 if quick else max(1, FULL_TOKENS_PER_BATCH // seq_len))
            for row_set in rows:
                shapes.append(KernelShape(size, heads, kv_heads, head_dim, seq_len, row_set, dtype,
                                          demo_len=demo_len))
    return shapes
