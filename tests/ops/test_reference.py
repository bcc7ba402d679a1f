"""The oracle itself against an independent float64 brute force (explicit loops in numpy), with and without
attention sinks, with v's head dim equal to q's or not."""
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
    sinks = problem.get("sinks")
    batch, heads, seq_len, head_dim = q.shape
    group = heads // k.shape[1]
    num_classes = problem["num_classes"]
    out = np.zeros((batch, heads, seq_len, v.shape[-1]))
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
                if sinks is not None:  # the sink's logit joins the denominator only
                    total += math.exp(float(sinks[h]) - top)
                for j, w in zip(keys, weights):
                    out[b, h, i] += w / total * v[b, h // group, j]
                    if key_class[b, j] >= 0:
                        mass[b, h, i, key_class[b, j]] += w / total
    return out, mass


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("seq_len,heads,kv_heads", [(1, 2, 2), (9, 3, 1), (17, 4, 2)])
@pytest.mark.parametrize("sinks,value_dim", [(False, None), (True, None), (False, 7), (True, 3)])
def test_reference_matches_brute_force(causal, padding, seq_len, heads, kv_heads, sinks, value_dim):
    problem = make_problem(batch=2, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=5,
                           num_classes=3, padding=padding, rows="all", dtype=torch.float64, sinks=sinks,
                           value_dim=value_dim)
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


def test_reference_sinks_take_their_share_and_nothing_else():
    """With sinks, each visible row's masses of an all-labelled sequence sum to 1 - P_sink < 1; rows that see no key
    still give zeros; sinks of -1e4 give the result without sinks."""
    problem = make_problem(seq_len=12, rows="all", padding="left", dtype=torch.float64, sinks=True)
    problem["key_class"] = torch.randint(0, 3, problem["key_class"].shape)
    out, mass = ak.label_attention(**problem, backend="reference")
    plain_out, plain_mass = ak.label_attention(**{**problem, "sinks": None}, backend="reference")
    total = mass.double().sum(-1)
    assert (total[1] < 1 - 1e-3).all() and (total[1] > 0).all()
    assert (out[0, :, :3] == 0).all() and (mass[0, :, :3] == 0).all()  # left padding: rows 0-2 see no key
    far_out, far_mass = ak.label_attention(**{**problem, "sinks": torch.full((4,), -1e4)}, backend="reference")
    torch.testing.assert_close(far_out, plain_out, rtol=0, atol=0)
    torch.testing.assert_close(far_mass, plain_mass, rtol=0, atol=0)
