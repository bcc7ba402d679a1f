"""Shared test helpers: random problems and relative-error comparison against the reference."""
from __future__ import annotations

import torch

import abft_kernels as ak


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere gives inf so it never passes."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom


def make_problem(batch=2, heads=4, kv_heads=2, seq_len=63, head_dim=16, num_classes=3, padding="none",
                 rows="last", dtype=torch.float32, device="cpu", seed=0, value_dim=None, sinks=False,
                 sinks_dtype=torch.float32):
    """A random label_attention problem. padding: none|left|right|both. rows: last|edges|all|random|repeated.
    value_dim: v's head dim Dv (default head_dim). sinks: add one sink logit per query head (about 2 ± 2, so that
    the sink takes a sizeable share of short and long rows alike)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = randn(batch, heads, seq_len, head_dim), randn(batch, kv_heads, seq_len, head_dim), \
        randn(batch, kv_heads, seq_len, value_dim or head_dim)
    key_class = torch.randint(-1, num_classes, (batch, seq_len), generator=gen).to(device)
    pad = torch.ones(batch, seq_len, dtype=torch.bool)
    n_pad = max(1, seq_len // 4) if seq_len > 1 else 0
    if padding in ("left", "both"):
        pad[0, :n_pad] = False
    if padding in ("right", "both"):
        pad[-1, seq_len - n_pad:] = False
    key_padding_mask = None if padding == "none" else pad.to(device)
    if rows == "all":
        query_rows = None
    elif rows == "last":
        query_rows = torch.full((batch, 1), seq_len - 1)
    elif rows == "edges":
        query_rows = torch.tensor([[0, seq_len - 1, -1]]).repeat(batch, 1)
    elif rows == "random":
        query_rows = torch.randint(-1, seq_len, (batch, 5), generator=gen)
    elif rows == "repeated":  # repeated rows (their gradients add up), empty slots, both edges
        last, mid = seq_len - 1, seq_len // 2
        query_rows = torch.tensor([[last, last, -1, 0, mid], [mid, 0, mid, mid, -1]])[:batch]
    else:
        raise ValueError(rows)
    if query_rows is not None:
        query_rows = query_rows.to(device)
    problem = dict(q=q, k=k, v=v, key_class=key_class, num_classes=num_classes, query_rows=query_rows,
                   key_padding_mask=key_padding_mask)
    if sinks:  # drawn last, so that problems without sinks stay as they were
        problem["sinks"] = (2 + 2 * torch.randn(heads, generator=gen)).to(device=device, dtype=sinks_dtype)
    return problem


RESULT_NAMES = ("out", "mass", "dq", "dk", "dv", "dsinks")


def run_with_grads(problem: dict, backend: str, causal: bool = True, seed: int = 1, sinks_constant=None):
    """Forward, then backward through a random linear function of (out, mass).

    Returns out, mass, dq, dk, dv, dsinks (dsinks is None for a problem without sinks). sinks_constant: sinks
    passed without requires_grad (the problem then has sinks=None)."""
    names = ("q", "k", "v", "sinks")
    leaves = {name: problem[name].detach().clone().requires_grad_(True) for name in names
              if problem.get(name) is not None}
    args = {**problem, **leaves}
    if sinks_constant is not None:
        args["sinks"] = sinks_constant
    out, mass = ak.label_attention(**args, causal=causal, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    w_mass = torch.randn(mass.shape, generator=gen).to(mass.device)
    ((out * w_out).float().sum() + (mass * w_mass).sum()).backward()
    return (out, mass, *(leaves[name].grad if name in leaves else None for name in names))


def reference_problem(problem: dict) -> dict:
    """The same problem with q, k, v in float64 (sinks stay as they are: every backend reads them as floats)."""
    return {**problem, **{n: problem[n].double() for n in ("q", "k", "v")}}


def assert_matches_reference(problem: dict, backend: str, causal: bool = True, tol: float = 1e-5):
    got = run_with_grads(problem, backend, causal)
    want = run_with_grads(reference_problem(problem), "reference", causal)
    for name, x, ref in zip(RESULT_NAMES, got, want):
        if ref is None:
            assert x is None, name
            continue
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
        err = rel_err(x, ref)
        assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e} (backend={backend})"
