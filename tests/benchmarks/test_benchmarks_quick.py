"""The benchmark runner's quick mode on CPU: it runs end to end and writes well-formed results for every
compared method. No timing assertions (performance lives in benchmarks/, not in tests)."""
import json
import math
import subprocess

import pytest
import torch

from abft_kernels.recipes import cli
from benchmarks import run
from benchmarks.methods import METHODS
from benchmarks.model_level import MODEL_METHODS

CPU = torch.device("cpu")
STATUSES = {"ok", "OOM", "skipped", "unavailable", "error"}


def _reject_nan(constant):
    raise AssertionError(f"JSON holds {constant}, which is not valid JSON")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)])
    return out, json.loads((out / "quick.json").read_text(), parse_constant=_reject_nan)


def test_quick_mode_records_its_environment(quick_results):
    _, results = quick_results
    assert results["mode"] == "quick" and results["command"].startswith("python -m benchmarks.run --quick")
    for key in ("device", "torch", "triton", "transformers", "date", "commit"):
        assert key in results["environment"], key


def test_every_kernel_method_runs_or_says_why_not(quick_results):
    _, results = quick_results
    rows = results["kernel"]
    assert {r["method"] for r in rows} == set(METHODS)
    assert {(r["rows"], r["mode"]) for r in rows} == {(s, m) for s in ("last", "demos", "all") for m in run.MODES}
    for r in rows:
        assert r["status"] in STATUSES
        expected = "ok" if METHODS[r["method"]].unavailable(CPU, r["mode"] == "fwd+bwd") is None else "unavailable"
        assert r["status"] == expected, r
        if expected == "ok":
            assert r["median_ms"] > 0 and r["tflops"] > 0 and r["peak_memory_gib"] is None
        else:
            assert r["reason"]
    for name in ("eager", "sdpa", "torch", "sdpa_onehot"):  # these run on any device
        assert any(r["method"] == name and r["status"] == "ok" for r in rows), name


def test_masses_of_every_method_match_the_exact_ones(quick_results):
    _, results = quick_results
    checked = [r for r in results["kernel"] if r["status"] == "ok" and r["mode"] == "fwd"
               and METHODS[r["method"]].computes_masses]
    assert {r["method"] for r in checked} >= {"eager", "torch", "sdpa_onehot"}
    for r in checked:
        assert math.isfinite(r["mass_rel_err"]) and r["mass_rel_err"] < 2e-2, r  # bf16 inputs


def test_every_model_method_runs_and_agrees(quick_results):
    _, results = quick_results
    rows = results["model"]
    assert [r["method"] for r in rows] == list(MODEL_METHODS)
    assert {r["model"] for r in rows} == {"smollm2-135m"}
    assert {r["method"]: r["backend"] for r in rows} == {"eager": None, "sdpa": None, "sdpa_torch": "torch",
                                                          "abft": "torch"}
    eager = rows[0]
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["weights_gib"] > 0 and r["saved_gib"] > 0, r
        assert r["peak_rss_gib"] is None, r  # one process ran every point: no point's own peak
        if not MODEL_METHODS[r["method"]].computes_masses:  # plain SDPA training: no masses, another loss
            assert r["mean_label_mass"] is None and r["loss"] > 0, r
            continue
        # every method computes the same masses (fp32 on CPU)
        assert r["mean_label_mass"] == pytest.approx(eager["mean_label_mass"], rel=1e-4), r
        assert r["loss"] == pytest.approx(eager["loss"], rel=1e-4, abs=1e-6), r


def test_tables_and_plots_are_written(quick_results):
    out, results = quick_results
    table = (out / "quick.md").read_text()
    assert "Quick mode" in table and results["command"] in table
    for r in results["kernel"] + results["model"]:
        if r["status"] == "ok":
            assert f" {r['method']} |" in table
    assert results["plots"]
    for name in results["plots"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_abft_bench_runs_the_runner(tmp_path):
    cli.main(["bench", "--quick", "--levels", "kernel", "--methods", "sdpa", "--rows", "last", "--modes", "fwd",
              "--out", str(tmp_path)])
    results = json.loads((tmp_path / "quick.json").read_text())
    assert [r["status"] for r in results["kernel"]] == ["ok", "ok"]


def test_isolate_measures_each_point_in_its_own_process_and_reuses_it(tmp_path, monkeypatch):
    common = ["--levels", "model", "--device", "cpu", "--threads", "1", "--models", "smollm2-135m", "--model-layers",
              "1", "--model-methods", "sdpa", "--model-seq-lens", "128", "--model-reps", "1", "--isolate", "--name",
              "iso", "--no-plots", "--out", str(tmp_path)]
    skipped = run.main(common + ["--budget-s", "0"])["model"]
    assert [r["status"] for r in skipped] == ["skipped"] and not (tmp_path / "iso.points.jsonl").exists()

    [row] = run.main(common)["model"]
    assert row["status"] == "ok" and row["num_layers"] == 1 and row["saved_gib"] > 0, row
    assert row["peak_rss_gib"] > 0 and row["wall_s"] >= 0, row  # the child process's own peak
    assert [json.loads(line) for line in (tmp_path / "iso.points.jsonl").read_text().splitlines()] == [row]
    assert json.loads((tmp_path / "iso.json").read_text())["model"] == [row]

    def no_process(args, point):
        raise AssertionError(f"measured again: {point}")

    monkeypatch.setattr(run, "isolated_run", no_process)
    assert run.main(common)["model"] == [row]  # a rerun with the same --name takes the point from the points file


def test_model_rows_record_the_backend_of_their_own_shape(monkeypatch):
    """The backend a model-level row records is resolved on the step's sequence length (one query row of N), not on
    a one-token probe: the H200 session recorded "triton" for steps that ran "torch" before this."""
    from abft_kernels.ops.label_attention import backends
    from benchmarks.model_level import resolved_backend

    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", {"few rows": ("torch",), "many rows": ("reference",)})
    choice = resolved_backend(MODEL_METHODS["abft"], "smollm2-135m", 4096, CPU, torch.float32)
    assert choice["backend"] == "torch" and "few rows (R=1, N=4096)" in choice["backend_reason"]
    assert resolved_backend(MODEL_METHODS["sdpa"], "smollm2-135m", 4096, CPU, torch.float32)["backend"] is None


def test_gradient_checkpointing_option_reaches_the_model_and_the_isolated_point(tmp_path, monkeypatch):
    """--gradient-checkpointing on CPU (default there: off) checkpoints every layer, so the step saves fewer bytes
    for backward, the row says so, and an --isolate child is given the same option."""
    common = ["--levels", "model", "--device", "cpu", "--threads", "1", "--models", "smollm2-135m", "--model-layers",
              "2", "--model-methods", "sdpa", "abft", "--model-seq-lens", "128", "--model-reps", "1", "--no-plots",
              "--out", str(tmp_path)]
    plain = run.main(common + ["--name", "plain"])["model"]
    checkpointed = run.main(common + ["--name", "ckpt", "--gradient-checkpointing"])["model"]
    assert [r["gradient_checkpointing"] for r in plain + checkpointed] == [False] * 2 + [True] * 2
    for before, after in zip(plain, checkpointed):
        assert after["status"] == "ok" and after["saved_gib"] < before["saved_gib"], (before, after)
    assert "gradient checkpointing True" in (tmp_path / "ckpt.md").read_text()

    children = []
    real_run = subprocess.run

    def child(command, **kwargs):
        if "benchmarks.run" not in command:  # git, for the report's commit
            return real_run(command, **kwargs)
        children.append(command)
        return subprocess.CompletedProcess(command, 1, "", "stopped here")

    monkeypatch.setattr(run.subprocess, "run", child)
    run.main(common + ["--name", "iso", "--isolate", "--gradient-checkpointing"])
    assert len(children) == 2 and all("--gradient-checkpointing" in c for c in children)
