"""scripts/gpu_session.sh, the one prepared call of a lent GPU machine, on CPU: its dry run, its rehearsal on tiny
CPU shapes, the per-test time limit, the performance goals (scripts/performance_goals.py), and the runner's time
budget, --resume and CUDA-context handling that the session relies on. Nothing here times anything."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import run

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


goals = load_script("performance_goals")
gpu_session = load_script("gpu_session")
GPU_STAGES = [s.name for s in gpu_session.STAGES if s.needs_gpu]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the whole session")


def session(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_session.sh"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    return result, time.monotonic() - start


def check_files(out: Path) -> list:
    """What the device tool brings back: at most 8 plain files, plain names, nothing deeper."""
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= gpu_session.MAX_FILES, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files), files
    return files


@no_gpu
def test_dry_run_skips_every_gpu_stage_with_its_reason(tmp_path):
    result, seconds = session(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert seconds < 60
    for name in GPU_STAGES:
        assert re.search(rf"== {name}: .*\n   skipped: no CUDA GPU visible", result.stdout), name
    goals_block = result.stdout.split("Goals (GPU headline):")[-1]  # the goals come last: headline, then fused kernel
    headline, fused = goals_block.split("Goals (the fused kernel):")
    assert headline.count("NOT MEASURED") == 6 and fused.count("NOT MEASURED") == 6 and "== " not in goals_block
    assert check_files(tmp_path) == ["install.log", "session.json", "session.log"]
    record = json.loads((tmp_path / "session.json").read_text())
    assert [s["name"] for s in record["stages"]] == [s.name for s in gpu_session.STAGES]
    assert {s["status"] for s in record["stages"] if s["name"] in GPU_STAGES} == {"skipped"}
    assert [g["status"] for g in record["goals"]] == ["not measured"] * 6
    assert [g["status"] for g in record["fused_goals"]] == ["not measured"] * 6
    assert (tmp_path / "session.log").read_text() == result.stdout


@no_gpu
def test_rehearsal_runs_the_kernel_tests_and_model_stages_on_cpu(tmp_path):
    result, _ = session(tmp_path, "--rehearse")
    assert result.returncode == 0, result.stdout + result.stderr
    files = check_files(tmp_path)
    assert files == ["bench.log", "gpu-headline.json", "gpu-headline.md", "install.log", "session.json",
                     "session.log", "tests.log"]
    record = json.loads((tmp_path / "session.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert {stages[n]["status"] for n in ("kernel", "tests", "model")} == {"ok"}
    assert {stages[n]["status"] for n in ("install", "ctest", "flex")} == {"skipped"}
    assert record["tests"]["counts"]["passed"] > 0 and not record["tests"]["failed"]
    results = json.loads((tmp_path / "gpu-headline.json").read_text())
    kernel = {(r["method"], r["rows"], r["mode"]): r["status"] for r in results["kernel"]}
    assert set(kernel) == {(m, rows, mode) for m in run.PRESETS["gpu-headline"]["methods"]
                           for rows in ("last", "all", "demos") for mode in run.MODES}
    assert kernel["sdpa", "last", "fwd+bwd"] == "ok" and kernel["triton", "all", "fwd"] == "unavailable"
    assert [(r["method"], r["status"], r["num_layers"]) for r in results["model"]] == [
        ("eager", "ok", 2), ("sdpa", "ok", 2), ("abft", "ok", 2)]
    assert len(results["commands"]) == 2  # the model stage resumed the kernel stage's results
    assert results["goals"] == record["goals"] and len(results["goals"]) == 6
    assert results["fused_goals"] == record["fused_goals"] and len(results["fused_goals"]) == 6
    assert "## Goals (GPU headline)" in (tmp_path / "gpu-headline.md").read_text()
    assert "## Goals (the fused kernel)" in (tmp_path / "gpu-headline.md").read_text()


def test_per_test_time_limit_and_record(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import time, pytest\n"
        "def test_quick(): pass\n"
        "def test_slow(): time.sleep(30)\n"
        "def test_wrong(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skipped(): pass\n")
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "ABFT_TEST_TIME_LIMIT_S": "1", "ABFT_TEST_RECORD": str(record), "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.pytest_time_limit", "-p",
                    "no:cacheprovider", str(tmp_path / "test_sample.py")], cwd=tmp_path, env=env,
                   capture_output=True, timeout=120)
    assert time.monotonic() - start < 25  # the 30 s sleep was cut at 1 s
    summary = gpu_session.summarise_tests(record)
    assert summary["counts"] == {"passed": 1, "failed": 1, "timed out": 1, "skipped": 1}
    assert summary["outcomes"] == {"test_sample.py::test_quick": "passed", "test_sample.py::test_slow": "timed out",
                                   "test_sample.py::test_wrong": "failed", "test_sample.py::test_skipped": "skipped"}
    assert "assert 1 == 2" in {f["nodeid"]: f["message"] for f in summary["failed"]}["test_sample.py::test_wrong"]


def test_summary_of_a_run_stopped_in_a_test(tmp_path):
    record = tmp_path / "record.jsonl"
    events = [{"event": "collected", "nodeids": ["t::a", "t::b", "t::c"]}, {"event": "start", "nodeid": "t::a"}]
    events += [{"event": "report", "nodeid": "t::a", "when": w, "outcome": "passed", "duration": 0.1, "message": ""}
               for w in ("setup", "call", "teardown")]
    events += [{"event": "start", "nodeid": "t::b"}]  # then the process was killed
    record.write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = gpu_session.summarise_tests(record)
    assert summary["counts"] == {"passed": 1, "unfinished": 1, "not run": 1}
    assert summary["unfinished"] == ["t::b"]


def kernel_row(method, n, rows, mode, ms, status="ok", **extra):
    return {"method": method, "seq_len": n, "rows": rows, "mode": mode, "status": status, "median_ms": ms,
            "tflops": None if ms is None else 100 / ms, **extra}


def test_goals_met_missed_and_not_measured():
    kernel = [kernel_row("sdpa", 2048, "last", "fwd+bwd", 1.0), kernel_row("triton", 2048, "last", "fwd+bwd", 1.2),
              kernel_row("cuda", 2048, "last", "fwd+bwd", 1.05),  # 1.05x: met
              kernel_row("sdpa", 8192, "last", "fwd+bwd", 2.0), kernel_row("triton", 8192, "last", "fwd+bwd", 2.4),
              kernel_row("sdpa", 2048, "all", "fwd", 1.0), kernel_row("triton", 2048, "all", "fwd", 1.3),
              kernel_row("sdpa_onehot", 2048, "all", "fwd", 1.4),
              kernel_row("sdpa", 8192, "all", "fwd", 1.0), kernel_row("triton", 8192, "all", "fwd", 1.2),
              kernel_row("sdpa_onehot", 8192, "all", "fwd", None, status="OOM", reason="CUDA out of memory"),
              kernel_row("sdpa", 32768, "all", "fwd", 1.0), kernel_row("triton", 32768, "all", "fwd", 1.0),
              kernel_row("sdpa_onehot", 32768, "all", "fwd", None, status="error", reason="RuntimeError: x")]
    model = [{"model": "llama-3-8b", "method": m, "seq_len": n, "status": "ok", "median_ms": 1.0,
              "peak_memory_gib": peak, "weights_gib": 15.0, "num_layers": 32, "model_num_layers": 32}
             for m, n, peak in (("eager", 4096, 60.0), ("sdpa", 4096, 16.0), ("abft", 4096, 16.5),
                                ("sdpa", 32768, 30.0), ("abft", 32768, 31.0))]
    model.append({"model": "llama-3-8b", "method": "eager", "seq_len": 32768, "status": "skipped",
                  "reason": "needs ~400 GiB", "num_layers": 32, "model_num_layers": 32})
    statuses = [g["status"] for g in goals.evaluate({"kernel": kernel, "model": model})]
    # R=1: 8192 at 1.2x; R=N: 0.77x, 0.83x, 1.0x of sdpa; faster than sdpa_onehot at 2048, which cannot run at
    # 8192 and failed at 32768; model: 1.03x of sdpa at both N, eager only 3.6x above abft, eager cannot run at 32768
    assert statuses == ["missed", "met", "met where measured", "met", "missed", "met"]
    kernel[4]["median_ms"] = 2.1
    kernel[-1].update(status="ok", median_ms=2.0)
    assert [g["status"] for g in goals.evaluate({"kernel": kernel, "model": model})][:3] == ["met"] * 3
    kernel[6].update(median_ms=1.5, tflops=100 / 1.5)  # 0.67x of sdpa's TFLOP/s, and slower than sdpa_onehot
    assert [g["status"] for g in goals.evaluate({"kernel": kernel, "model": model})][1:3] == ["missed"] * 2
    assert [g["status"] for g in goals.evaluate({})] == ["not measured"] * 6


def test_fused_kernel_goals_met_missed_and_not_measured():
    """The fused kernel: R = N fwd >= 0.7x and fwd+bwd >= 0.6x sdpa's TFLOP/s, R = 1 fwd+bwd <= 1.3x sdpa's time at 2048 and
    <= 1.1x from 8192, masses within 1e-5 of the fp32 recompute, and the R = N/64 numbers; ratios within one run."""
    kernel = [kernel_row("sdpa", 2048, "all", "fwd", 1.0), kernel_row("triton", 2048, "all", "fwd", 1.4,
                                                                       mass_rel_err=3e-7),
              kernel_row("sdpa_onehot", 2048, "all", "fwd", 1.5),
              kernel_row("sdpa", 8192, "all", "fwd", 2.0), kernel_row("triton", 8192, "all", "fwd", 3.0,
                                                                       mass_rel_err=2e-5),
              kernel_row("sdpa", 2048, "all", "fwd+bwd", 1.0), kernel_row("triton", 2048, "all", "fwd+bwd", 1.6),
              kernel_row("sdpa", 2048, "last", "fwd+bwd", 1.0), kernel_row("triton", 2048, "last", "fwd+bwd", 1.25),
              kernel_row("sdpa", 8192, "last", "fwd+bwd", 1.0), kernel_row("triton", 8192, "last", "fwd+bwd", 1.25),
              kernel_row("sdpa", 2048, "demos", "fwd+bwd", 1.0), kernel_row("torch", 2048, "demos", "fwd+bwd", 1.5),
              kernel_row("triton", 2048, "demos", "fwd+bwd", None, status="OOM", reason="CUDA out of memory")]
    goals = gpu_session.fused_goals({"kernel": kernel})
    # R=N fwd: 0.71x at 2048, 0.67x at 8192; faster than onehot at 2048, no onehot row at 8192; fwd+bwd 0.62x;
    # R=1: 1.25x meets 1.3x at 2048, misses 1.1x at 8192; mass error 2e-5 at 8192; demos: torch measured
    assert [g["status"] for g in goals] == ["missed", "met where measured", "met", "missed", "missed", "met"]
    assert "torch 1.50x" in goals[5]["details"][0]
    kernel[4].update(median_ms=2.5, tflops=100 / 2.5, mass_rel_err=5e-6)
    kernel[10].update(median_ms=1.05, tflops=100 / 1.05)
    assert [g["status"] for g in gpu_session.fused_goals({"kernel": kernel})][:5] == [
        "met", "met where measured", "met", "met", "met"]
    assert [g["status"] for g in gpu_session.fused_goals({})] == ["not measured"] * 6


def test_long_context_goals_pair_points_by_checkpointing_and_merge_files(tmp_path):
    """The long-context goals on CPU: peak RSS within 10% at every N, time within 15% from N=2048, rows paired on (N,
    checkpointing); a later results file replaces the same point of an earlier one (older rows lack num_layers)."""
    def row(method, n, rss, ms, checkpointing=False, **extra):
        return {"model": "smollm2-135m", "method": method, "seq_len": n, "batch": 1, "dtype": "float32",
                "status": "ok", "peak_rss_gib": rss, "median_ms": ms, "gradient_checkpointing": checkpointing,
                "num_layers": 30, "model_num_layers": 30, "load_average_1min": 1.0, **extra}

    older = dict(num_layers=None, model_num_layers=None)  # as results files before the --num-layers option
    old = [row("sdpa", 1024, 2.0, 10.0, **older), row("abft", 1024, 2.5, 10.0, **older),
           row("sdpa", 2048, 3.0, 20.0), row("abft", 2048, 3.1, 25.0)]
    new = [row("abft", 1024, 2.1, 10.0), row("sdpa", 2048, 3.0, 20.0), row("abft", 2048, 3.1, 22.0),
           row("sdpa", 16384, 5.0, 100.0, True), row("abft", 16384, 5.2, 110.0, True),
           row("abft", 16384, 20.0, 99.0)]  # no sdpa without checkpointing to pair it with: not measured
    for name, rows in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"model": rows}))
    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    assert [g["status"] for g in goals.long_context_goals({"model": goals.merged_model_rows(paths[:1])})] == [
        "missed", "missed"]  # 1.25x RSS at 1024, 1.25x time at 2048
    rss, time_goal = goals.long_context_goals({"model": goals.merged_model_rows(paths)})
    assert rss["status"] == "met where measured" and time_goal["status"] == "met where measured"
    assert any(d.startswith("N=16384, checkpointed: abft 5.2 GiB vs sdpa 5 GiB") for d in rss["details"])
    assert not any(d.startswith("N=1024") for d in time_goal["details"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the benchmarks package, installed or not
    printed = subprocess.run([sys.executable, str(SCRIPTS / "performance_goals.py"), *map(str, paths)], cwd=tmp_path,
                             env=env, check=True, capture_output=True, text=True).stdout
    assert printed.count("**met where measured**") == 2


def test_runner_time_budget_and_resume(tmp_path):
    common = ["--quick", "--device", "cpu", "--threads", "1", "--levels", "kernel", "--methods", "sdpa",
              "--rows", "last", "--modes", "fwd", "--seq-lens", "128", "--no-plots", "--out", str(tmp_path)]
    first = run.main(common + ["--budget-s", "0"])
    assert [r["status"] for r in first["kernel"]] == ["skipped"] and "time budget" in first["kernel"][0]["reason"]
    second = run.main(common + ["--resume"])
    assert [r["status"] for r in second["kernel"]] == ["ok"]  # the row skipped for time was measured this time
    assert len(second["commands"]) == 2
    third = run.main(common + ["--resume", "--methods", "sdpa", "torch"])
    assert [(r["method"], r["status"]) for r in third["kernel"]] == [("sdpa", "ok"), ("torch", "ok")]
    assert third["kernel"][0]["median_ms"] == second["kernel"][0]["median_ms"]  # kept, not measured again


def test_runner_stops_when_a_call_breaks_the_cuda_context(tmp_path, monkeypatch):
    def broken_call(method, shape, device, backward, timing, ref_mass):
        return {**run.kernel_level.kernel_row(method, shape, backward), "status": "error",
                "reason": "AcceleratorError: CUDA error: an illegal memory access was encountered"}

    common = ["--quick", "--device", "cpu", "--threads", "1", "--levels", "kernel", "--methods", "torch", "sdpa",
              "--rows", "last", "--modes", "fwd", "--seq-lens", "128", "--no-plots", "--out", str(tmp_path)]
    monkeypatch.setattr(run.kernel_level, "measure_kernel", broken_call)
    monkeypatch.setattr(run, "cuda_context_error", lambda device: "CUDA error: an illegal memory access")
    first = run.main(common)
    assert "illegal memory access" in first["context_broken"]
    assert [r["method"] for r in first["kernel"]] == ["torch"]  # it stopped there: sdpa was not run
    assert list(first["broken_methods"]) == ["kernel/torch"]
    monkeypatch.undo()
    second = run.main(common + ["--resume"])  # a fresh process: the broken method is not run again
    assert [(r["method"], r["status"]) for r in second["kernel"]] == [("torch", "error"), ("sdpa", "ok")]
    assert "context_broken" not in second
