"""The backend registry: explicit backends raise their own reason; auto takes the first backend that can."""
import pytest
import torch

import abft_kernels as ak
from abft_kernels.ops.label_attention import backends
from helpers import make_problem

needs_triton = pytest.mark.skipif(not ak.backend_available("triton"), reason="triton is not installed")


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.label_attention(**make_problem(seq_len=4), backend="flash")


def test_auto_on_cpu_is_torch_and_says_why():
    choice = ak.resolve_backend(**make_problem(seq_len=4))
    assert choice == ak.BackendChoice("torch", "auto on cpu, many rows (R=1, N=4): first of ('torch',) that takes "
                                               "the call")


@pytest.mark.parametrize("seq_len,num_rows,regime", [(64, 1, "few rows"), (64, 8, "few rows"), (64, 9, "many rows"),
                                                     (64, None, "many rows")])
def test_auto_chooses_by_the_number_of_rows(monkeypatch, seq_len, num_rows, regime):
    """R <= N / 8 rows carrying a mass is "few rows" (the row recompute first), more is "many rows" (the fused kernel
    first); the choice names the regime."""
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", {"few rows": ("torch",), "many rows": ("reference",)})
    problem = make_problem(seq_len=seq_len)
    problem["query_rows"] = None if num_rows is None else torch.arange(num_rows)[None].expand(2, -1)
    choice = ak.resolve_backend(**problem)
    assert choice.name == ("torch" if regime == "few rows" else "reference")
    assert choice.reason.startswith(f"auto on cpu, {regime} (R={num_rows or seq_len}, N={seq_len})")


def test_explicit_backend_is_requested():
    assert ak.resolve_backend(**make_problem(seq_len=4), backend="reference") == ("reference", "requested")


@needs_triton
@pytest.mark.parametrize("change,reason", [
    (dict(num_classes=65), "num_classes up to 64"),
    (dict(head_dim=264), "head dims up to 256"),
    (dict(value_dim=264), "head dims up to 256, v has 264"),
    (dict(dtype=torch.float64), "float16, bfloat16 or float32"),
])
def test_auto_falls_back_when_the_first_choice_cannot(monkeypatch, change, reason):
    """With triton first in auto's order, arguments beyond the kernel's limits go to torch, and the reason says why;
    asked for explicitly, triton raises that reason."""
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", dict.fromkeys(("few rows", "many rows"), ("triton", "torch")))
    problem = make_problem(seq_len=4, **change)
    choice = ak.resolve_backend(**problem)
    assert choice.name == "torch" and "skipped triton" in choice.reason and reason in choice.reason
    with pytest.raises(ValueError, match=f"backend='triton' cannot run this call: .*{reason}"):
        ak.label_attention(**problem, backend="triton")


@needs_triton
@pytest.mark.parametrize("change", [{}, dict(sinks=True), dict(value_dim=24, sinks=True)])
def test_auto_takes_the_first_candidate_that_can(monkeypatch, change):
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", dict.fromkeys(("few rows", "many rows"), ("triton", "torch")))
    assert ak.resolve_backend(**make_problem(seq_len=4, **change)).name == "triton"


def test_auto_raises_when_no_candidate_can(monkeypatch):
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", dict.fromkeys(("few rows", "many rows"), ("cuda",)))
    monkeypatch.setattr(backends, "_load", lambda name: (None, "the extension is not built"))
    with pytest.raises(ValueError, match=r"found no backend for this call: cuda \(not available here: the extension"):
        ak.label_attention(**make_problem(seq_len=4))


def test_status_of_every_backend():
    for name in ak.BACKENDS:
        status = ak.backend_status(name)
        assert (status == "available") == ak.backend_available(name)
    if not ak.cuda_extension_available():
        assert ak.backend_status("cuda") == ak.cuda_extension_status()
