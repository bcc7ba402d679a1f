"""Bytes autograd keeps for backward from one label_attention forward, at N and 2N (the long-context case).

    python -m benchmarks.saved_bytes [--backend torch] [--seq-lens 2048 4096]

B = 1, Hq = 2, Hkv = 1, D = 16, C = 3, float32; rows "last" (one query row) or "all"; padding "none" or "left"
(the first quarter of the keys). Each storage is counted once (benchmarks.timing.saved_bytes). Deterministic:
memory that grows 4x per doubling of N is an N x N tensor kept for backward.
"""
from __future__ import annotations

import argparse

import torch

import abft_kernels as ak

from .timing import saved_bytes


def measure(backend: str, seq_len: int, rows: str, padding: str) -> int:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, 16, generator=gen, requires_grad=True) for heads in (2, 1, 1))
    key_class = torch.randint(-1, 3, (1, seq_len), generator=gen)
    query_rows = torch.full((1, 1), seq_len - 1) if rows == "last" else None
    mask = torch.ones(1, seq_len, dtype=torch.bool)
    mask[0, :seq_len // 4] = False
    mask = mask if padding == "left" else None
    return saved_bytes(lambda: ak.label_attention(q, k, v, key_class, 3, query_rows, key_padding_mask=mask,
                                                  backend=backend))[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saved_bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 4096])
    args = parser.parse_args(argv)
    for rows in ("last", "all"):
        for padding in ("none", "left"):
            for seq_len in args.seq_lens:
                size = measure(args.backend, seq_len, rows, padding)
                print(f"backend={args.backend} rows={rows:4} padding={padding:4} N={seq_len:6}: "
                      f"{size / 2 ** 20:8.2f} MiB")


if __name__ == "__main__":
    main()
