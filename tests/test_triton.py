"""Backend "triton" (the fused kernel) against the reference: out, mass, dq, dk, dv (and dsinks) by relative error.

On CPU the kernels run through TRITON_INTERPRET=1 (set by conftest.py), on a GPU natively. The interpreter
is slow, so batch, heads and head dim stay small wherever they are not the point of the test.
"""
import os
import subprocess
import sys
import textwrap
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


# Compiles kernels for sm_90 with Triton's own ptxas, no GPU needed: the GPU code path (which the interpreter
# never takes: tensor-core dots, runtime branches in loops, missing-gradient pointers) must at least compile.
_COMPILE_FOR_GPU = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import abft_kernels.ops.label_attention.triton_backend as T

    def compile_kernel(kernel, dtype, constexprs, kind=None):
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        warps, stages = 4, 1
        if kind is not None:  # the first candidate of the autotune table
            bucket = T._head_dim_bucket(max(constexprs["BLOCK_D"], constexprs["BLOCK_DV"]))
            block_m, block_n, warps, stages = T._GPU_CANDIDATES[kind][bucket][0]
            constexprs = dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
        pointers = dict(KeyCode="*i32", RowSlot="*i32", SinksLog2="*fp32", LseLog2="*fp32", Mass="*fp32",
                        Delta="*fp32", GradMass="*fp32", **{name: dtype for name in ("Q", "K", "V", "Out", "GradOut", "GradQ",
                                                                      "GradK", "GradV")})
        signature = {name: "constexpr" if name in constexprs else
                     pointers.get(name, "fp32" if "scale" in name else "i32") for name in fn.arg_names}
        triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))

    for dtype, fp32, head_dim, value_dim, sinks in (("*fp16", False, 128, 128, False), ("*fp32", True, 64, 64, False),
                                                    ("*bf16", False, 128, 64, True)):
        constexprs = dict(CAUSAL=True, HAS_SINKS=sinks, DOT_FP32=fp32, BLOCK_D=head_dim, BLOCK_DV=value_dim, BLOCK_C=16)
        if not sinks:
            constexprs["SinksLog2"] = None
        compile_kernel(T.label_attention_forward_kernel, dtype, constexprs, "forward")
    grads = dict(CAUSAL=True, DOT_FP32=False, HAS_OUT_GRAD=True, HAS_MASS_GRAD=True, BLOCK_D=64, BLOCK_DV=128,
                 BLOCK_C=16)
    compile_kernel(T.label_attention_backward_dkdv_kernel, "*fp16", grads, "backward")
    compile_kernel(T.label_attention_backward_dq_kernel, "*bf16", grads, "backward")
    compile_kernel(T.label_attention_backward_dkdv_kernel, "*fp16", dict(grads, HAS_OUT_GRAD=False, GradOut=None, GradV=None),
                   "backward")
    compile_kernel(T.label_attention_backward_dq_kernel, "*fp16", dict(grads, HAS_MASS_GRAD=False, GradMass=None), "backward")
    compile_kernel(T.label_attention_backward_delta_kernel, "*bf16",
                   dict(HAS_OUT_GRAD=True, HAS_MASS_GRAD=True, BLOCK_DV=128, BLOCK_C=64, BLOCK_M=64))
""")



def test_kernels_compile_for_gpu(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


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
