"""Backend "torch" against the reference: outputs, masses and gradients of q, k, v and sinks (fp32, rel err < 1e-5)."""
import pytest
import torch

import abft_kernels as ak
from helpers import RESULT_NAMES, assert_matches_reference, make_problem, reference_problem, rel_err, run_with_grads


@pytest.mark.parametrize("seq_len", [1, 7, 63, 130])
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (3, 1), (8, 2)])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_shapes_and_gqa(seq_len, heads, kv_heads, rows):
    problem = make_problem(heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=16, num_classes=4, rows=rows,
                           seed=seq_len * 7 + heads)
    assert_matches_reference(problem, "torch")


@pytest.mark.parametrize("padding", ["left", "right", "both"])
@pytest.mark.parametrize("rows", ["edges", "random", "all"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_rows_and_causality(padding, rows, causal):
    problem = make_problem(heads=4, kv_heads=1, seq_len=37, head_dim=8, num_classes=2, padding=padding, rows=rows,
                           seed=3)
    assert_matches_reference(problem, "torch", causal=causal)


@pytest.mark.parametrize("num_classes", [1, 2, 5, 8])
def test_num_classes(num_classes):
    problem = make_problem(seq_len=40, num_classes=num_classes, rows="random", padding="left", seed=num_classes)
    assert_matches_reference(problem, "torch")


# Attention sinks (gpt-oss) and a value head dim of its own (DeepSeek's multi-head latent attention), apart and together.
SINKS_AND_VALUE_DIMS = [(True, 16, None), (False, 16, 24), (False, 24, 16), (True, 24, 16)]
SINKS_AND_VALUE_DIMS_IDS = ["sinks", "D16-Dv24", "D24-Dv16", "sinks-D24-Dv16"]


@pytest.mark.parametrize("sinks,head_dim,value_dim", SINKS_AND_VALUE_DIMS, ids=SINKS_AND_VALUE_DIMS_IDS)
@pytest.mark.parametrize("seq_len", [1, 63, 130])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_sinks_and_value_head_dim(sinks, head_dim, value_dim, seq_len, rows):
    problem = make_problem(heads=8, kv_heads=2, seq_len=seq_len, head_dim=head_dim, value_dim=value_dim, rows=rows,
                           sinks=sinks, seed=seq_len)
    assert_matches_reference(problem, "torch")


@pytest.mark.parametrize("sinks,head_dim,value_dim", SINKS_AND_VALUE_DIMS, ids=SINKS_AND_VALUE_DIMS_IDS)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("rows", ["edges", "repeated", "all"])
@pytest.mark.parametrize("causal", [True, False])
def test_sinks_and_value_head_dim_with_padding(sinks, head_dim, value_dim, padding, rows, causal):
    problem = make_problem(heads=4, kv_heads=1, seq_len=37, head_dim=head_dim, value_dim=value_dim, padding=padding,
                           rows=rows, sinks=sinks, seed=4)
    assert_matches_reference(problem, "torch", causal=causal)


def test_sinks_of_another_float_dtype_get_their_gradient_in_it():
    problem = make_problem(seq_len=20, rows="random", sinks=True, sinks_dtype=torch.float64)
    assert_matches_reference(problem, "torch")
    assert run_with_grads(problem, "torch")[-1].dtype == torch.float64


@pytest.mark.parametrize("rows,sinks_dtype", [("last", torch.float32), ("all", torch.bfloat16)])
def test_sinks_in_half_precision_close_to_reference(rows, sinks_dtype):
    """bf16 within 1e-2, except the sinks' gradient within 3e-2: it is a sum over B·N rows of terms of both signs,
    each rounded by SDPA's bf16 backward, so it can cancel down (seed 0: 1.9e-2 measured; fp32 on the same inputs:
    3.5e-7). The masses are computed in fp32, and so is the sink's logit (sink_key's hi + lo): within 1e-4."""
    problem = make_problem(seq_len=50, rows=rows, padding="left", dtype=torch.bfloat16, sinks=True,
                           sinks_dtype=sinks_dtype)
    got = run_with_grads(problem, "torch")
    want = run_with_grads(reference_problem(problem), "reference")
    assert got[0].dtype == torch.bfloat16 and got[-1].dtype == sinks_dtype
    for name, x, ref in zip(RESULT_NAMES, got, want):
        assert rel_err(x, ref) < {"dsinks": 3e-2, "mass": 1e-4}.get(name, 1e-2), name


def test_fully_padded_rows_are_zero_not_nan():
    problem = make_problem(seq_len=20, padding="left", rows="edges")
    out, mass = ak.label_attention(**problem, backend="torch")
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    assert (out[0, :, :5] == 0).all()  # left-padded rows see no real key under the causal mask
    assert (mass[0, :, 0] == 0).all() and (mass[:, :, 2] == 0).all()  # row 0 of sample 0, and the -1 slot


def test_mass_rows_sum_to_label_share():
    """With every key labelled, each visible row's masses sum to 1."""
    problem = make_problem(seq_len=30, rows="all", num_classes=3)
    problem["key_class"] = torch.randint(0, 3, problem["key_class"].shape)
    _, mass = ak.label_attention(**problem, backend="torch")
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:-1]), rtol=0, atol=1e-5)


def test_half_precision_close_to_reference():
    problem = make_problem(seq_len=50, rows="last", dtype=torch.bfloat16)
    out, mass = ak.label_attention(**problem, backend="torch")
    ref_out, ref_mass = ak.label_attention(**{**problem, **{n: problem[n].double() for n in "qkv"}},
                                           backend="reference")
    assert out.dtype == torch.bfloat16 and mass.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-2 and rel_err(mass, ref_mass) < 1e-2


def test_auto_is_torch_on_cpu():
    choice = ak.resolve_backend(**make_problem(seq_len=5))
    assert choice.name == "torch" and "auto on cpu" in choice.reason


def test_a_wrong_backend_would_fail():
    """The comparison can fail: a mass computed with the wrong scale is caught."""
    problem = make_problem(seq_len=33, rows="all")
    _, mass = ak.label_attention(**problem, scale=0.5, backend="torch")
    _, ref = ak.label_attention(**{**problem, **{n: problem[n].double() for n in "qkv"}}, backend="reference")
    assert rel_err(mass, ref) > 1e-3


def test_sdpa_broadcasts_kv_heads_only_where_cuda_has_a_kernel_for_it(monkeypatch):
    """On CUDA only the flash kernel (sm80+) takes enable_gqa; fp32, masked, wide-head or pre-sm80 GQA calls must
    repeat the heads instead of falling back to SDPA's O(N²) math kernel (an H200 run asked for 128 GiB at
    N = 32768 before this)."""
    from abft_kernels.ops.label_attention.sdpa import sdpa_broadcasts_kv_heads
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert sdpa_broadcasts_kv_heads(cuda, torch.bfloat16, 128, masked=False)
    assert not sdpa_broadcasts_kv_heads(cuda, torch.float32, 128, masked=False)
    assert not sdpa_broadcasts_kv_heads(cuda, torch.bfloat16, 128, masked=True)
    assert not sdpa_broadcasts_kv_heads(cuda, torch.float16, 512, masked=False)
    assert sdpa_broadcasts_kv_heads(torch.device("cpu"), torch.float32, 128, masked=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not sdpa_broadcasts_kv_heads(cuda, torch.float16, 128, masked=False)


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_repeated_kv_heads_match_the_reference(monkeypatch, padding, rows):
    """The path that repeats the key/value heads for SDPA (CUDA's fp32 and masked calls) is exact: here on CPU,
    with the CUDA rule forced."""
    from abft_kernels.ops.label_attention import sdpa
    monkeypatch.setattr(sdpa, "sdpa_broadcasts_kv_heads", lambda *args, **kwargs: False)
    problem = make_problem(heads=6, kv_heads=2, seq_len=45, head_dim=8, num_classes=3, padding=padding, rows=rows,
                           seed=11)
    assert_matches_reference(problem, "torch")
