"""The CUDA extension (csrc/, backend "cuda").

Without a GPU (CI): every csrc source compiles (kernels with nvcc for sm_80 and sm_90, the binding
against torch's headers), the CMake library and ctest executable build, the ctest's C++ reference
matches abft_kernels' reference, and cuda_backend's autograd glue is right around a stand-in extension.
With a GPU and the extension built: the kernels against the reference, forward and backward.
"""
from __future__ import annotations

import ctypes
import importlib
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import abft_kernels as ak
from abft_kernels.ops.label_attention import backends, extension as _extension
from helpers import assert_matches_reference, make_problem, rel_err, run_with_grads

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
CMAKE = shutil.which("cmake")
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# torch's CUDAExtension compiles .cu files with these: the kernels must not rely on the half operators.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

needs_nvcc = pytest.mark.skipif(NVCC is None or CXX is None,
                                reason="nvcc or a C++ compiler not found: cannot check that csrc/ compiles")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not ak.cuda_extension_available(),
    reason="no CUDA GPU here: the CUDA kernels are compiled by the tests above but not run"
    if not torch.cuda.is_available() else ak.cuda_extension_status())


def run_all(commands, cwd):
    """Runs the commands in parallel; fails with the output of every one that failed."""
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    failures = [f"$ {' '.join(map(str, cmd))}\n{out}" for cmd, proc, out in zip(commands, procs, outputs)
                if proc.returncode != 0]
    assert not failures, "\n\n".join(failures)
    return outputs


def cuda_include_dir() -> Path:
    """The toolkit's include dir, as nvcc itself reports its install root (nvcc may be a wrapper script)."""
    dryrun = subprocess.run([NVCC, "--dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.*)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    assert top, "nvcc --dryrun did not report its install root (TOP=)"
    return Path(top.group(1).strip()).resolve() / "include"


def torch_binding_command(tmp_path: Path):
    torch_include = Path(torch.__file__).parent / "include"
    includes = [torch_include, torch_include / "torch" / "csrc" / "api" / "include", sysconfig.get_paths()["include"],
                cuda_include_dir()]
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # Generated when torch is built with CUDA; CPU wheels lack it. Its one macro only matters when linking.
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, tmp_path / "stub")
    system_includes = [flag for path in includes for flag in ("-isystem", str(path))]
    return [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=_C", *system_includes,
            str(CSRC / "torch_binding.cpp")]


@needs_nvcc
def test_csrc_compiles_for_sm80_and_sm90(tmp_path):
    """Each kernel file with nvcc for sm_80 and sm_90 (warnings are errors), and the torch binding."""
    kernels = sorted(CSRC.glob("*.cu"))
    assert kernels, "no .cu files in csrc/"
    commands = [[NVCC, "-std=c++17", "-O3", *ARCH_FLAGS, *TORCH_NVCC_DEFINES, "--Werror", "all-warnings",
                 "-Xcompiler", "-Wall", "-c", str(cu), "-o", str(tmp_path / f"{cu.stem}.o")] for cu in kernels]
    run_all(commands + [torch_binding_command(tmp_path)], cwd=tmp_path)


@needs_nvcc
@pytest.mark.skipif(CMAKE is None, reason="cmake not found: cannot build the CMake target")
def test_cmake_builds_library_and_ctest(tmp_path):
    """CMakeLists.txt configures and builds the kernel library and its test; ctest runs it on a GPU
    (it reports itself skipped without one) and must pass."""
    build = tmp_path / "build"
    run_all([[CMAKE, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={NVCC}"]], cwd=tmp_path)
    run_all([[CMAKE, "--build", str(build), "-j", "2"]], cwd=tmp_path)
    (ctest_output,) = run_all([[shutil.which("ctest") or "ctest", "--output-on-failure"]], cwd=build)
    print(ctest_output)
    if not torch.cuda.is_available():
        assert "Skipped" in ctest_output


# ---------------------------------------------------------------------------------------------------
# The C++ reference of the ctest against abft_kernels' reference, through ctypes.

@pytest.fixture(scope="module")
def cpp_reference(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler: cannot build the ctest's CPU reference")
    library = tmp_path_factory.mktemp("reference") / "libreference_row_mass.so"
    run_all([[CXX, "-std=c++17", "-O2", "-shared", "-fPIC", str(CSRC / "tests" / "reference_row_mass.cpp"),
              "-o", str(library)]], cwd=library.parent)
    return ctypes.CDLL(str(library))


def pointer(array: np.ndarray):
    return array.ctypes.data_as(ctypes.c_void_p)


def cpp_masses_and_grads(lib, problem, causal, grad_mass):
    q, k = (np.ascontiguousarray(problem[n].float().numpy()) for n in ("q", "k"))
    rows = np.ascontiguousarray(problem["query_rows"].numpy().astype(np.int64))
    key_class = np.ascontiguousarray(problem["key_class"].numpy().astype(np.int64))
    mask = problem["key_padding_mask"]
    mask = None if mask is None else np.ascontiguousarray(mask.numpy().astype(np.uint8))
    batch, heads, seq_len, head_dim = q.shape
    num_rows, num_classes = rows.shape[1], problem["num_classes"]
    dims = [ctypes.c_int(x) for x in (batch, heads, k.shape[1], seq_len, head_dim, num_rows, num_classes, causal)]
    common = [pointer(q), pointer(k), pointer(rows), pointer(key_class), None if mask is None else pointer(mask),
              *dims, ctypes.c_double(1.0 / head_dim ** 0.5)]
    mass = np.zeros((batch, heads, num_rows, num_classes))
    grad = np.ascontiguousarray(grad_mass.double().numpy())
    grad_q, grad_k = np.zeros(q.shape), np.zeros(k.shape)
    lib.reference_row_mass_forward(*common, pointer(mass))
    lib.reference_row_mass_backward(*common, pointer(grad), pointer(grad_q), pointer(grad_k))
    return [torch.from_numpy(x) for x in (mass, grad_q, grad_k)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding,rows", [("none", "last"), ("both", "edges"), ("left", "random")])
def test_cpp_reference_matches_reference(cpp_reference, causal, padding, rows):
    problem = make_problem(heads=4, kv_heads=2, seq_len=37, head_dim=8, num_classes=3, padding=padding, rows=rows,
                           seed=11)
    if problem["query_rows"].shape[1] > 1:
        problem["query_rows"][0, :2] = torch.tensor([5, 5])  # a repeated row: its gradients add up
    leaves = {n: problem[n].double().requires_grad_(True) for n in ("q", "k", "v")}
    _, mass = ak.label_attention(**{**problem, **leaves}, causal=causal, backend="reference")
    grad_mass = torch.randn(mass.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (mass.double() * grad_mass).sum().backward()
    got = cpp_masses_and_grads(cpp_reference, problem, causal, grad_mass)
    for name, x, ref in zip(("mass", "dq", "dk"), got, (mass, leaves["q"].grad, leaves["k"].grad)):
        assert rel_err(x, ref) < 1e-6, f"{name}: relative error {rel_err(x, ref):.3e}"


# ---------------------------------------------------------------------------------------------------
# cuda_backend's glue (argument normalisation, autograd, adding repeated slots' dq) on CPU, with a
# stand-in for abft_kernels._C that keeps the contract of csrc/row_mass.h.

class TorchRowMassExtension:
    """The contract of csrc/row_mass.h in float64 PyTorch; like the kernels, the backward recomputes the row's
    probabilities from the lse it is given (cuda_backend passes the lse with the sink when there are sinks)."""
    MAX_NUM_CLASSES = 64
    SUPPORTED_HEAD_DIMS = (8,)

    @staticmethod
    def _scores(q, k, rows, key_class, mask, causal, scale):
        batch, heads, seq_len, head_dim = q.shape
        keys = k.double().repeat_interleave(heads // k.shape[1], dim=1)
        q_rows = q.double().gather(2, rows.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, head_dim))
        visible = (rows >= 0)[:, :, None] & ((torch.arange(seq_len) <= rows[:, :, None]) | (not causal))
        if mask is not None:
            visible = visible & mask[:, None, :]
        scores = (scale * q_rows @ keys.transpose(-1, -2)).masked_fill(~visible[:, None], float("-inf"))
        one_hot = (key_class[:, :, None] == torch.arange(TorchRowMassExtension.MAX_NUM_CLASSES)).double()[:, None]
        return keys, q_rows, scores, one_hot

    def row_mass_forward(self, q, k, rows, key_class, mask, num_classes, causal, scale):
        _, _, scores, one_hot = self._scores(q, k, rows, key_class, mask, causal, scale)
        lse = scores.logsumexp(-1)  # -inf for empty slots and rows that see no key
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
        return (probs @ one_hot[..., :num_classes]).float(), lse.float()

    def row_mass_backward(self, q, k, rows, key_class, mask, grad_mass, mass, lse, causal, scale):
        keys, q_rows, scores, one_hot = self._scores(q, k, rows, key_class, mask, causal, scale)
        probs = torch.exp(scores - lse.double()[..., None]).nan_to_num(0.0)
        grad = grad_mass.double()
        grad_scores = probs * (grad @ one_hot[..., :grad.shape[-1]].transpose(-1, -2)
                               - (grad * mass.double()).sum(-1, keepdim=True))
        grad_q_rows = scale * grad_scores @ keys  # one per slot: cuda_backend adds repeated rows
        grad_k = scale * grad_scores.transpose(-1, -2) @ q_rows
        grad_k = grad_k.view(k.shape[0], k.shape[1], -1, *k.shape[2:]).sum(2)
        return grad_q_rows.float(), grad_k.to(k.dtype)


CUDA_BACKEND = "abft_kernels.ops.label_attention.cuda_backend"


@pytest.fixture
def cuda_backend_with_stand_in(monkeypatch):
    monkeypatch.setattr(_extension, "extension", TorchRowMassExtension())
    monkeypatch.delitem(sys.modules, CUDA_BACKEND, raising=False)
    backends.clear_backend_cache()
    module = importlib.import_module(CUDA_BACKEND)
    monkeypatch.setattr(module, "unsupported", lambda args: None)  # the stand-in runs on CPU
    yield module
    sys.modules.pop(CUDA_BACKEND, None)
    backends.clear_backend_cache()


@pytest.mark.parametrize("rows", ["last", "edges", "random", "repeated", "all"])
@pytest.mark.parametrize("padding,causal", [("none", True), ("both", True), ("left", False)])
def test_cuda_backend_glue_matches_reference(cuda_backend_with_stand_in, rows, padding, causal):
    problem = make_problem(heads=6, kv_heads=2, seq_len=21, head_dim=8, num_classes=3, padding=padding,
                           rows="random" if rows == "repeated" else rows, seed=5)
    if rows == "repeated":
        problem["query_rows"] = torch.tensor([[20, 20, -1, 3, 20], [7, 0, 7, 7, -1]])
    assert_matches_reference(problem, "cuda", causal=causal)


@pytest.mark.parametrize("sinks,head_dim,value_dim", [(True, 8, None), (False, 8, 24), (True, 24, 16)],
                         ids=["sinks", "D8-Dv24", "sinks-D24-Dv16"])
@pytest.mark.parametrize("rows,padding,causal", [("last", "none", True), ("repeated", "left", True),
                                                 ("edges", "right", False), ("all", "left", False)])
@pytest.mark.parametrize("seq_len", [1, 63])
def test_cuda_backend_glue_with_sinks_and_value_head_dim(cuda_backend_with_stand_in, sinks, head_dim, value_dim, rows,
                                                         padding, causal, seq_len):
    """Sinks: the kernels' masses rescaled by sigmoid(lse - sink) and their backward given mass' and lse' (see
    cuda_backend) match the reference, and so does the sinks' gradient. Dv != D: only SDPA reads v."""
    problem = make_problem(heads=6, kv_heads=2, seq_len=seq_len, head_dim=head_dim, value_dim=value_dim,
                           num_classes=3, padding=padding, rows=rows, sinks=sinks, seed=seq_len)
    assert_matches_reference(problem, "cuda", causal=causal)


def test_cuda_backend_glue_with_constant_sinks(cuda_backend_with_stand_in):
    """Sinks that are constants (no requires_grad) still shape the gradients of q, k and v."""
    problem = make_problem(heads=6, kv_heads=2, seq_len=21, head_dim=8, rows="repeated", padding="left", sinks=True)
    got = run_with_grads({**problem, "sinks": None}, "cuda", sinks_constant=problem["sinks"])
    want = run_with_grads({**problem, "sinks": None, **{n: problem[n].double() for n in "qkv"}}, "reference",
                          sinks_constant=problem["sinks"])
    for name, x, ref in zip(("out", "mass", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) < 1e-5, name


def test_cuda_backend_unavailable_without_extension():
    if ak.cuda_extension_available():
        pytest.skip("the extension is built here")
    assert not ak.backend_available("cuda")
    assert "not built" in ak.cuda_extension_status() or "does not load" in ak.cuda_extension_status()
    problem = make_problem(head_dim=64)
    with pytest.raises(ValueError, match="cuda"):
        ak.label_attention(**problem, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# On a GPU with the extension built.

@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads,seq_len,padding,rows", [
    (4, 2, 257, "both", "random"), (3, 3, 1, "none", "edges"), (8, 1, 63, "left", "last"), (4, 4, 130, "right", "all"),
])
def test_gpu_matches_reference(dtype, tol, head_dim, heads, kv_heads, seq_len, padding, rows):
    for causal in (True, False):
        problem = make_problem(heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim, num_classes=4,
                               padding=padding, rows=rows, dtype=dtype, device="cuda", seed=seq_len + head_dim)
        assert_matches_reference(problem, "cuda", causal=causal, tol=tol)


@needs_gpu
def test_gpu_repeated_rows_and_many_classes():
    problem = make_problem(heads=4, kv_heads=2, seq_len=100, head_dim=64, num_classes=64, padding="both",
                           device="cuda")
    problem["query_rows"] = torch.tensor([[99, 99, -1, 50, 99], [0, 98, 98, -1, -1]], device="cuda")
    assert_matches_reference(problem, "cuda")


def run_grads_of_mass(problem):
    q, k = (problem[n].detach().clone().requires_grad_(True) for n in ("q", "k"))
    _, mass = ak.label_attention(**{**problem, "q": q, "k": k}, backend="cuda")
    (mass * torch.linspace(-1, 1, mass.numel(), device=mass.device).view_as(mass)).sum().backward()
    return q.grad, k.grad


@needs_gpu
def test_gpu_backward_is_deterministic():
    problem = make_problem(heads=8, kv_heads=2, seq_len=300, head_dim=128, rows="random", dtype=torch.bfloat16,
                           device="cuda")
    first = [t.clone() for t in run_grads_of_mass(problem)]
    second = run_grads_of_mass(problem)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("change,match", [
    (dict(head_dim=48), "head dim"), (dict(dtype=torch.float64), "float32, float16 or bfloat16"),
    (dict(device="cpu"), "CUDA tensor"),
])
def test_gpu_unsupported_inputs_raise(change, match):
    problem = make_problem(**{**dict(head_dim=64, device="cuda"), **change})
    with pytest.raises(ValueError, match=match):
        ak.label_attention(**problem, backend="cuda")


@needs_gpu
def test_gpu_too_many_classes_raise():
    problem = make_problem(head_dim=64, num_classes=65, device="cuda")
    with pytest.raises(ValueError, match="num_classes"):
        ak.label_attention(**problem, backend="cuda")
