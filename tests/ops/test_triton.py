"""Backend "triton" (the fused kernel) against the reference: out, mass, dq, dk, dv (and dsinks) by relative error.

On CPU the kernels run through TRITON_INTERPRET=1 (set by conftest.py), on a GPU natively. The interpreter
is slow, so batch, heads and head dim stay small wherever they are not the point of the test.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import abft_kernels as ak
from helpers import RESULT_NAMES, assert_matches_reference, make_problem, rel_err, run_with_grads

pytestmark = [
    pytest.mark.skipif(not ak.backend_available("triton"), reason="triton is not installed"),
    # The interpreter itself turns loop bounds held in 1-element arrays into ints; numpy warns about it.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL, HALF_TOL = 1e-4, 1e-2


def problem(**kwargs):
    return make_problem(device=DEVICE, **kwargs)


def reference_problem(p):
    return {**p, **{name: p[name].double() for name in ("q", "k", "v")}}


@pytest.mark.parametrize("seq_len", [1, 7, 63, 130])
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (3, 1), (8, 2)])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_shapes_and_gqa(seq_len, heads, kv_heads, rows):
    p = problem(batch=2 if heads < 8 else 1, heads=heads, kv_heads=kv_heads, seq_len=seq_len, num_classes=4,
                rows=rows, seed=seq_len * 7 + heads)
    assert_matches_reference(p, "triton", tol=FP32_TOL)


@pytest.mark.parametrize("padding", ["left", "right", "both"])
@pytest.mark.parametrize("rows", ["edges", "random", "all"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_rows_and_causality(padding, rows, causal):
    p = problem(heads=4, kv_heads=1, seq_len=37, num_classes=2, padding=padding, rows=rows, seed=3)
    assert_matches_reference(p, "triton", causal=causal, tol=FP32_TOL)


# Attention sinks (gpt-oss) and a value head dim of its own (multi-head latent attention), apart and together.
SINKS_AND_VALUE_DIMS = {"sinks": (True, 16, None), "D16-Dv24": (False, 16, 24), "D24-Dv16": (False, 24, 16),
                        "sinks-D24-Dv16": (True, 24, 16)}


@pytest.mark.parametrize("config", SINKS_AND_VALUE_DIMS)
@pytest.mark.parametrize("seq_len", [1, 63, 130])
def test_sinks_and_value_head_dim(config, seq_len):
    sinks, head_dim, value_dim = SINKS_AND_VALUE_DIMS[config]
    p = problem(batch=1, heads=4, kv_heads=2, seq_len=seq_len, head_dim=head_dim, value_dim=value_dim, sinks=sinks,
                rows="last" if seq_len == 130 else "all", seed=seq_len)
    assert_matches_reference(p, "triton", tol=FP32_TOL)


@pytest.mark.parametrize("config", ["sinks", "sinks-D24-Dv16"])
@pytest.mark.parametrize("padding,rows,causal", [("left", "repeated", True), ("right", "edges", False),
                                                 ("left", "all", False), ("right", "random", True)])
def test_sinks_and_value_head_dim_with_padding(config, padding, rows, causal):
    sinks, head_dim, value_dim = SINKS_AND_VALUE_DIMS[config]
    p = problem(heads=4, kv_heads=1, seq_len=37, head_dim=head_dim, value_dim=value_dim, sinks=sinks,
                padding=padding, rows=rows, seed=6)
    assert_matches_reference(p, "triton", causal=causal, tol=FP32_TOL)


def test_sinks_without_gradient():
    """Sinks that are constants (no requires_grad) still shape the gradients of q, k and v."""
    p = problem(heads=2, kv_heads=1, seq_len=20, rows="edges", padding="left", sinks=True, seed=8)
    got = run_with_grads({**p, "sinks": None}, "triton", sinks_constant=p["sinks"])
    want = run_with_grads({**reference_problem(p), "sinks": None}, "reference", sinks_constant=p["sinks"])
    for name, x, ref in zip(RESULT_NAMES[:5], got, want):
        assert rel_err(x, ref) < FP32_TOL, name


def test_sinks_and_value_head_dim_in_half_precision():
    """fp16 within 1e-2; the sinks' gradient, a sum over B·N rows of terms of both signs, within 3e-2."""
    p = problem(batch=1, heads=2, kv_heads=1, seq_len=70, head_dim=64, value_dim=80, rows="random", padding="left",
                dtype=torch.float16, sinks=True, sinks_dtype=torch.float16, seed=2)
    got = run_with_grads(p, "triton")
    want = run_with_grads(reference_problem(p), "reference")
    assert got[0].dtype == torch.float16 and got[-1].dtype == torch.float16
    for name, x, ref in zip(RESULT_NAMES, got, want):
        assert rel_err(x, ref) < (3e-2 if name == "dsinks" else HALF_TOL), name


@pytest.mark.parametrize("num_classes", [1, 2, 5, 8, 64])
def test_num_classes(num_classes):
    p = problem(heads=2, kv_heads=1, seq_len=40, num_classes=num_classes, rows="random", padding="left",
                seed=num_classes)
    assert_matches_reference(p, "triton", tol=FP32_TOL)


def test_num_classes_above_limit_raises():
    from abft_kernels.ops.label_attention.triton_backend import MAX_NUM_CLASSES
    p = problem(seq_len=8, num_classes=MAX_NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="num_classes"):
        ak.label_attention(**p, backend="triton")


@pytest.mark.parametrize("head_dim", [16, 64, 128, 80])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.float16, HALF_TOL)])
def test_head_dims_and_dtypes(head_dim, dtype, tol):
    # 70 rows: two query blocks and a ragged last one; 80 is padded to a 128-wide block and masked.
    p = problem(batch=1, heads=2, kv_heads=1, seq_len=70, head_dim=head_dim, rows="random", padding="left",
                dtype=dtype, seed=head_dim)
    assert_matches_reference(p, "triton", tol=tol)


def test_bfloat16():
    p = problem(batch=1, heads=2, kv_heads=1, seq_len=50, head_dim=32, rows="all", dtype=torch.bfloat16)
    assert_matches_reference(p, "triton", tol=HALF_TOL)


@pytest.mark.parametrize("graded", ["mass", "out"])
@pytest.mark.parametrize("sinks", [False, True])
def test_gradient_of_only_mass_or_only_out(graded, sinks):
    p = problem(heads=4, kv_heads=2, seq_len=45, rows="edges", padding="right", sinks=sinks, seed=5)
    names = ("q", "k", "v", "sinks") if sinks else ("q", "k", "v")
    grads = {}
    for backend, inputs in (("triton", p), ("reference", reference_problem(p))):
        leaves = {name: inputs[name].detach().clone().requires_grad_(True) for name in names}
        out, mass = ak.label_attention(**{**inputs, **leaves}, backend=backend)
        weight = torch.randn((out if graded == "out" else mass).shape, generator=torch.Generator().manual_seed(1))
        loss = (out * weight.to(out)).sum() if graded == "out" else (mass * weight.to(mass)).sum()
        loss.backward()
        grads[backend] = [leaves[name].grad for name in names]
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads["triton"], grads["reference"]):
        if want is None:  # v does not reach the mass
            assert got is None, name
        else:
            assert rel_err(got, want) < FP32_TOL, name


def test_backward_is_deterministic():
    p = problem(batch=1, heads=4, kv_heads=1, seq_len=70, rows="all", padding="left", seed=9)
    first, second = run_with_grads(p, "triton"), run_with_grads(p, "triton")
    for a, b in zip(first[:5], second[:5]):
        assert torch.equal(a, b)


def test_repeated_and_empty_query_rows():
    p = problem(heads=2, kv_heads=1, seq_len=30, padding="left")
    p["query_rows"] = torch.tensor([[29, 3, 29, -1], [0, -1, 17, 17]], device=DEVICE)
    assert_matches_reference(p, "triton", tol=FP32_TOL)
    _, mass = ak.label_attention(**p, backend="triton")
    assert torch.equal(mass[0, :, 0], mass[0, :, 2]) and torch.equal(mass[1, :, 2], mass[1, :, 3])
    assert (mass[0, :, 3] == 0).all() and (mass[1, :, 1] == 0).all()


def test_rows_without_keys_give_zeros_and_zero_gradients():
    p = problem(heads=2, kv_heads=1, seq_len=20, padding="left", rows="edges")
    out, mass, dq, dk, dv, _ = run_with_grads(p, "triton")
    assert all(torch.isfinite(t).all() for t in (out, mass, dq, dk, dv))
    assert (out[0, :, :5] == 0).all() and (dq[0, :, :5] == 0).all()  # left padding, causal: rows 0-4 see no key
    assert (mass[0, :, 0] == 0).all() and (mass[:, :, 2] == 0).all()  # row 0 of sample 0, and the -1 slot
    assert (dk[0, :, :5] == 0).all() and (dv[0, :, :5] == 0).all()  # padded keys get no gradient


def test_non_contiguous_inputs():
    """q, k, v as transformers hands them over: [B, N, H, D] storage viewed as [B, H, N, D]."""
    p = problem(heads=4, kv_heads=2, seq_len=33, rows="random", seed=11)
    for name in ("q", "k", "v"):
        p[name] = p[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not p[name].is_contiguous()
    assert_matches_reference(p, "triton", tol=FP32_TOL)


# Issue 25: key blocks wholly before a query block run without causal or bounds masks; a block that holds padding
# still masks its padded keys (a per-block flag). Under the interpreter the forward and dQ kernels take 64 query
# rows x 32 keys, dK/dV 64 keys x 32 query rows, so at N = 200 most blocks take the unmasked path.
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["left", "both"])
def test_unmasked_key_blocks_with_padding(padding, causal):
    p = problem(batch=2, heads=2, kv_heads=1, seq_len=200, num_classes=3, padding=padding, rows="all", seed=21)
    assert_matches_reference(p, "triton", causal=causal, tol=FP32_TOL)


@pytest.mark.parametrize("blocks", [(32, 64), (32, 32), (64, 16)])
def test_other_block_shapes(blocks, monkeypatch):
    """The stage boundaries (unmasked, diagonal, ragged) hold for BLOCK_M above, equal to and below BLOCK_N."""
    from abft_kernels.ops.label_attention import triton_backend as T
    block_m, block_n = blocks
    monkeypatch.setattr(T, "_INTERPRETER_BLOCKS", {"forward": (block_m, block_n), "dq": (block_m, block_n),
                                                   "dkdv": (block_n, block_m)})
    p = problem(batch=2, heads=2, kv_heads=1, seq_len=131, num_classes=3, padding="both", rows="repeated",
                sinks=True, seed=22)
    assert_matches_reference(p, "triton", tol=FP32_TOL)


def test_key_block_flags():
    from abft_kernels.ops.label_attention.triton_backend import NOT_A_KEY, _key_block_flags
    pad = NOT_A_KEY.value
    code = torch.tensor([[pad, pad, -1, -1, -1, -1, 0, -1, 2, -1],
                         [-1, -1, -1, -1, -1, 1, -1, -1, -1, pad]], dtype=torch.int32)
    # blocks of 4: [0:4) [4:8) [8:10 + 2 past the end)
    assert _key_block_flags(code, 4).tolist() == [[1, 2, 3], [0, 2, 1]]
    assert _key_block_flags(code, 16).tolist() == [[3], [3]]


def _bf16_parts(x: torch.Tensor, parts: int) -> list:
    """x (fp32) as a sum of `parts` bf16 values, each the rounding of what the ones before left (as _exact_dot)."""
    result, rest = [], x
    for _ in range(parts):
        result.append(rest.to(torch.bfloat16).float())
        rest = rest - result[-1]
    return result


@pytest.mark.parametrize("seq_len", [4096, 16384])
def test_compensated_mass_dot_keeps_fp32_accuracy(seq_len):
    """The arithmetic of _exact_dot on GPU, in PyTorch: P (fp32 rows of a softmax over N keys in which one key
    takes almost all of the mass and the label keys 1e-7 to 1e-9 each) split into three bf16 parts, each times the
    one-hot Y (exact in bf16) with fp32 accumulation, gives every class mass within 1e-5 relative of the float64
    truth, as close as an fp32 dot; P rounded to bf16 alone misses by more than 1e-4."""
    gen = torch.Generator().manual_seed(seq_len)
    rows, num_classes = 8, 4
    scores = torch.randn(rows, seq_len, generator=gen, dtype=torch.float64) - 18.0
    scores[:, seq_len // 3] = 0.0  # P ~ 1 there
    key_class = torch.full((seq_len,), -1)
    label_keys = torch.randperm(seq_len, generator=gen)[: seq_len // 64]
    key_class[label_keys] = torch.arange(len(label_keys)) % num_classes
    key_class[seq_len // 3] = -1
    probs = torch.softmax(scores, -1)
    one_hot = torch.nn.functional.one_hot(key_class.clamp(min=0), num_classes).double() * (key_class >= 0)[:, None]
    truth = probs @ one_hot
    assert truth.max() < 1e-4 and probs.max() > 0.99  # masses ~1e-7..1e-5 next to P ~ 1
    p32 = probs.float()
    compensated = sum(part @ one_hot.float() for part in reversed(_bf16_parts(p32, 3)))
    fp32_dot = p32 @ one_hot.float()
    bf16_only = _bf16_parts(p32, 1)[0] @ one_hot.float()

    def worst(x):
        return ((x.double() - truth).abs() / truth).max().item()

    assert worst(compensated) < 1e-5 and worst(compensated) < 2 * worst(fp32_dot) + 1e-7
    assert worst(bf16_only) > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_masses_keep_fp32_accuracy(dtype):
    """fp16/bf16 inputs: the kernel's masses (three bf16 parts of P per dot; under the interpreter the parts are
    multiplied in fp32, which is exact) within 1e-5 of the float64 masses of the same inputs, 4e-3 with P in bf16
    alone; the row that carries a mass sees 1e-7-sized label probabilities next to one dominant key."""
    p = problem(batch=1, heads=2, kv_heads=1, seq_len=300, head_dim=32, num_classes=4, rows="random", dtype=dtype,
                seed=23)
    p["k"][:, :, 150] = p["q"][:, :1, 150:].mean(2) * 8  # a key that dominates the later rows' softmax
    _, mass = ak.label_attention(**p, backend="triton")
    _, want = ak.label_attention(**reference_problem(p), backend="reference")
    assert rel_err(mass, want) < 1e-5


def test_a_wrong_kernel_would_fail():
    """Each of the six comparisons can fail: a kernel with a wrong softmax scale misses all of them."""
    p = problem(heads=2, kv_heads=1, seq_len=33, rows="all", sinks=True)
    got = run_with_grads({**p, "q": p["q"] * 1.5}, "triton")
    want = run_with_grads(reference_problem(p), "reference")
    for name, x, ref in zip(RESULT_NAMES, got, want):
        assert rel_err(x, ref) > 1e-3, name


def test_unsupported_dtype_raises():
    p = problem(seq_len=8, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        ak.label_attention(**p, backend="triton")


def test_runs_under_torch_compile():
    """torch.compile graph-breaks around the kernels (torch.compiler.disable) and gives the eager result."""
    p = problem(heads=2, kv_heads=1, seq_len=20, rows="last")

    def loss(q, k, v):
        out, mass = ak.label_attention(q * 2, k, v, p["key_class"], p["num_classes"], query_rows=p["query_rows"],
                                       backend="triton")
        return out.sum() + mass[..., 0].sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="eager")):
        leaves = [p[name].detach().clone().requires_grad_(True) for name in ("q", "k", "v")]
        value = fn(*leaves)
        value.backward()
        results.append([value] + [leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


def test_kernels_compile_for_gpu(tmp_path):
    """The GPU code path (which the interpreter never takes: tensor-core and compensated dots, unmasked loads, runtime
    branches in loops, missing-gradient pointers) compiles for sm_90 and sm_80 with Triton's own ptxas, no GPU
    needed: scripts/triton_static_report.py --quick, one benchmark config per kernel (without spills) and the feature
    variants (compiled; their spills are reported)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_static_report.py"), "--quick", "--out",
                             str(tmp_path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())["configs"]
    assert {row["kernel"] for row in rows} == {"forward", "dkdv", "dq"} and len(rows) == 8
    assert all(row["ok"] for row in rows if row["variant"] == "benchmark")


def test_committed_static_report_covers_every_config():
    """benchmarks/results/triton-static/report.json (scripts/triton_static_report.py) holds every entry of the config
    tables, as they are now, for each dtype, compiled without spills and within the shared-memory limit."""
    from abft_kernels.ops.label_attention.triton_backend import _GPU_CONFIGS
    rows = json.loads((ROOT / "benchmarks" / "results" / "triton-static" / "report.json").read_text())["configs"]
    compiled = {(r["kernel"], r["table"], r["head_dim"], r["dtype"]): (r["BLOCK_M"], r["BLOCK_N"], r["num_warps"],
                                                                       r["num_stages"]) for r in rows if r["ok"]}
    for kind, tables in _GPU_CONFIGS.items():
        for table, configs in tables.items():
            for (bucket, precision), config in configs.items():
                for dtype in (("bf16", "fp16") if precision == "half" else ("fp32",)):
                    assert compiled.get((kind, table, bucket, dtype)) == config, (kind, table, bucket, dtype)


def test_config_tables():
    """Table 90 for compute capability 9.x and 10.x, table 80 for every other GPU; every head-dim bucket and
    precision has a config for each kernel; head dims are bucketed by the wider of D and Dv."""
    from abft_kernels.ops.label_attention import triton_backend as T
    assert [T.gpu_table(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))] == [80, 80, 80, 90, 90, 80]
    assert [T.head_dim_bucket(d, dv) for d, dv in ((16, 16), (64, 64), (80, 64), (64, 128), (256, 96))] == [
        64, 64, 128, 128, 256]
    for tables in T._GPU_CONFIGS.values():
        for configs in tables.values():
            assert set(configs) == {(b, p) for b in (64, 128, 256) for p in ("half", "fp32")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_picks_triton_on_cuda():
    p = problem(seq_len=8)
    assert ak.resolve_backend(**p).name == "triton"
    assert ak.resolve_backend(**reference_problem(p)).name == "torch"  # the kernel has no float64 path
    assert ak.resolve_backend(**problem(seq_len=8, num_classes=65)).name == "torch"  # above the kernel's limit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.float16, HALF_TOL),
                                       (torch.bfloat16, HALF_TOL)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_longer_sequences_on_gpu(dtype, tol, head_dim):
    p = problem(batch=2, heads=8, kv_heads=2, seq_len=1031, head_dim=head_dim, rows="all", padding="both",
                dtype=dtype, seed=head_dim)
    assert_matches_reference(p, "triton", tol=tol)
