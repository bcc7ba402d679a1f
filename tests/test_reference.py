"""The oracle itself against an independent float64 brute force (explicit loops in numpy)."""
import math

import numpy as np
import pytest
import torch

import abft_kernels as ak
from helpers import make_problem


def brute_force(problem, causal):
    q, k, v = (problem[n].double().numpy() for n in ("q", "k", "v"))
    key_class = problem["key_class"].numpy()
    pad = problem["key_padding_mask"]
    pad = np.ones(key_class.shape, bool) if pad is None else pad.numpy()
    batch, heads, seq_len, head_dim = q.shape
    group = heads // k.shape[1]
    num_classes = problem["num_classes"]
    out = np.zeros_like(q)
    mass = np.zeros((batch, heads, seq_len, num_classes))
    for b in range(batch):
        for h in range(heads):
            for i in range(seq_len):
                keys = [j for j in range(seq_len) if pad[b, j] and (not causal or j <= i)]
                if not keys:
                    continue
                scores = [q[b, h, i] @ k[b, h // group, j] / math.sqrt(head_dim) for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j, w in zip(keys, weights):
                    out[b, h, i] += w / total * v[b, h // group, j]
                    if key_class[b, j] >= 0:
                        mass[b, h, i, key_class[b, j]] += w / total
    return out, mass


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("seq_len,heads,kv_heads", [(1, 2, 2), (9, 3, 1), (17, 4, 2)])
def test_reference_matches_brute_force(causal, padding, seq_len, heads, kv_heads):
    problem = make_problem(batch=2, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=5,
                           num_classes=3, padding=padding, rows="all", dtype=torch.float64)
    out, mass = ak.label_attention(**problem, causal=causal, backend="reference")
    want_out, want_mass = brute_force(problem, causal)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mass.numpy(), want_mass, rtol=1e-6, atol=1e-7)  # mass is returned in fp32


def test_reference_selected_rows_gather_and_empty_slots():
    problem = make_problem(seq_len=11, rows="all", dtype=torch.float64)
    _, mass_all = ak.label_attention(**problem, backend="reference")
    rows = torch.tensor([[10, -1, 0], [3, 3, -1]])
    _, mass = ak.label_attention(**{**problem, "query_rows": rows}, backend="reference")
    for b in range(2):
        for r in range(3):
            want = mass_all[b, :, rows[b, r]] if rows[b, r] >= 0 else torch.zeros_like(mass_all[b, :, 0])
            torch.testing.assert_close(mass[b, :, r], want, rtol=0, atol=0)
