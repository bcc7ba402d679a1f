"""The one prepared call of a lent GPU machine: install, native tests, the headline sweep, the performance goals.
`bash scripts/gpu_session.sh` runs it from the repository root (see benchmarks/README.md, "GPU session").

Stages, most valuable first, each inside a time budget that it prints (a stage that cannot fit in what is left
is skipped with the reason, and every stage keeps the minimum of the later reserved ones free):
  environment  the GPU, driver, versions, commit;
  install      pip install -e . building the CUDA extension abft_kernels._C for sm_90 only;
  ctest        the CMake build of csrc/ for sm_90 and its C++ test against the CPU reference;
  kernel       the headline sweep, `python -m benchmarks.run --preset gpu-headline --levels kernel`;
  tests        tests/ops/test_cuda_extension.py, test_torch_backend.py, test_triton.py natively, a time limit per test;
  model        the Llama-3-8B ABFT training step, `... --preset gpu-headline --levels model --resume`;
  flex         FlexAttention on the headline shapes, with whatever time is left;
then the GPU headline goals (scripts/performance_goals.py), the fused-kernel goals (the fused Triton kernel against
SDPA in the same run: R = N forward and forward + backward, R = 1, R = N/64, the masses' error; fused_goals) and a
short table, last.

Everything lands in --out, at most 8 files, rewritten as the stages go so that a killed call keeps what it did:
session.log (the terminal output; written by the shell script), session.json (stages, test outcomes, goals,
environment), gpu-headline.json and gpu-headline.md (the benchmark results with the goals), install.log
(pip, CMake, ctest), bench.log (the runner's output), tests.log (pytest's output).

Without a CUDA GPU every GPU stage is skipped with the reason. --rehearse then runs the kernel, tests and model
stages on tiny CPU shapes instead (install, ctest and flex stay skipped), so that CI exercises this script's
plumbing (tests/benchmarks/test_gpu_session.py).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from benchmarks import report
from benchmarks.timing import EXIT_CONTEXT_BROKEN

ROOT = Path(__file__).resolve().parents[1]


def _load_sibling(name: str):
    """scripts/<name>.py as a module (scripts/ is no package; this works however this file was loaded)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


goals_module = _load_sibling("performance_goals")

RESULTS = "gpu-headline"  # the runner's preset, and so its file names
MAX_FILES = 8  # what the device tool brings back from $OUT
FINAL_RESERVE_S = 10  # kept for the goals, the tables and the last writes
TEST_FILES = ["tests/ops/test_cuda_extension.py", "tests/ops/test_torch_backend.py", "tests/ops/test_triton.py"]
# Compile-only checks, CPU-side: CI runs them; here the install and ctest stages build the same sources for sm_90.
TEST_DESELECT = {
    "tests/ops/test_cuda_extension.py::test_csrc_compiles_for_sm80_and_sm90": "nvcc for sm_80 and sm_90, compile only",
    "tests/ops/test_cuda_extension.py::test_cmake_builds_library_and_ctest": "CMake for sm_80 and sm_90 (stage ctest "
                                                                         "builds and runs it for sm_90)",
    "tests/ops/test_triton.py::test_kernels_compile_for_gpu": "triton.compile for sm_80 and sm_90, compile only",
}
TEST_TIME_LIMIT_S = 60  # per test phase; the first call of each Triton kernel variant compiles it
# Tiny CPU sizes of --rehearse, appended to the runner's GPU options (later options win).
REHEARSE_KERNEL = ["--quick", "--device", "cpu", "--threads", "1", "--seq-lens", "128", "--heads", "4", "2", "32"]
REHEARSE_MODEL = ["--quick", "--device", "cpu", "--threads", "1", "--models", "smollm2-135m", "--model-layers", "2",
                  "--model-seq-lens", "128", "--model-reps", "1"]


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float  # the stage gets at most this
    min_s: float  # and is not started with less
    reserved: bool  # earlier stages leave min_s free for it
    needs_gpu: bool
    rehearsed: bool  # runs on CPU under --rehearse
    run: Callable[["Session", float], dict]  # (session, limit_s) -> {"status", "note", ...}
    what: str


class Session:
    def __init__(self, out: Path, budget_s: float, python: str, rehearse: bool, stages: list):
        self.out, self.budget_s, self.python, self.rehearse, self.stages = out, budget_s, python, rehearse, stages
        self.start = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="abft-gpu-session-"))  # nothing here comes back
        self.gpu = False
        self.record = {"command": "bash scripts/gpu_session.sh " + shlex.join(sys.argv[1:]),
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "budget_s": budget_s, "rehearse": rehearse, "stages": [], "tests": None, "goals": []}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def write(self) -> None:
        path = self.out / "session.json"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.record, indent=1) + "\n")
        os.replace(partial, path)

    def run_command(self, cmd: list, limit_s: float, log: str, env: Optional[dict] = None) -> tuple:
        """Runs cmd from the repository root, its output appended to --out/log; past limit_s its process group
        is ended (SIGTERM, then SIGKILL). Returns (exit status, None when it was stopped; seconds; its output)."""
        path = self.out / log
        with open(path, "a") as f:
            f.write(f"\n$ {shlex.join(str(c) for c in cmd)}    # limit {limit_s:.0f} s, at {self.elapsed():.0f} s\n")
            f.flush()
            offset = f.tell()
            start = time.monotonic()
            # Its own process group (not session: the device tool ends a call's process sessions with it).
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, **group)
            try:
                status = proc.wait(timeout=max(limit_s, 1))
            except subprocess.TimeoutExpired:
                _end_group(proc)
                status = None
            wall = time.monotonic() - start
            with open(path) as log_file:
                log_file.seek(offset)
                output = log_file.read()
            f.write(f"[{'stopped at its limit' if status is None else f'exit status {status}'} after {wall:.0f} s]\n")
        return status, wall, output


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL 5 s later to whatever of it is left (its children too)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------
# Stages

def environment(session: Session, limit_s: float) -> dict:
    probe = ("import json, torch; from benchmarks import report\n"
             "gpu = torch.cuda.is_available()\n"
             "env = report.environment(torch.device('cuda' if gpu else 'cpu'))\n"
             "env['gpu'] = gpu\n"
             "env['capability'] = list(torch.cuda.get_device_capability()) if gpu else None\n"
             "print('ENVIRONMENT', json.dumps(env))")
    status, _, output = session.run_command([session.python, "-c", probe], limit_s, "install.log")
    if status != 0:
        return {"status": "failed", "note": "could not read the environment:\n" + _tail(output)}
    env = json.loads(next(line for line in output.splitlines() if line.startswith("ENVIRONMENT "))[12:])
    for name, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,"
                                      "clocks.sm,clocks.max.sm,temperature.gpu", "--format=csv,noheader"]),
                      ("nvcc", ["nvcc", "--version"]), ("cmake", ["cmake", "--version"])):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            lines = result.stdout.strip().splitlines()
            env[name] = lines[-1] if name == "nvcc" else lines[0]
        except (OSError, subprocess.TimeoutExpired, IndexError) as error:
            env[name] = f"n/a ({type(error).__name__})"
    env["cpu_count"] = os.cpu_count()
    env["pytest_xdist"] = importlib.util.find_spec("xdist") is not None
    session.gpu = env["gpu"]
    session.record["environment"] = env
    return {"status": "ok", "note": f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), triton "
                                    f"{env['triton']}, transformers {env['transformers']}, commit {env['commit']}; "
                                    f"nvidia-smi: {env['nvidia_smi']}"}


def install(session: Session, limit_s: float) -> dict:
    env = {"TORCH_CUDA_ARCH_LIST": "9.0", "ABFT_BUILD_CUDA": "1", "MAX_JOBS": str(min(16, os.cpu_count() or 1))}
    cmd = [session.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    status, wall, output = session.run_command(cmd, limit_s, "install.log", env)
    if status != 0:
        return {"status": "failed" if status is not None else "stopped", "note": "pip install:\n" + _tail(output)}
    check = "import abft_kernels as ak; print(ak.cuda_extension_available(), '|', ak.cuda_extension_status())"
    status, _, output = session.run_command([session.python, "-c", check], 60, "install.log")
    line = output.strip().splitlines()[-1] if output.strip() else ""
    available = status == 0 and line.startswith("True")
    return {"status": "ok" if available else "partial", "extension": line,
            "note": f"pip install took {wall:.0f} s; CUDA extension: {line or _tail(output)}"}


def ctest(session: Session, limit_s: float) -> dict:
    build = ROOT / "build" / "cmake-sm90"
    deadline = time.monotonic() + limit_s
    nvcc = shutil.which("nvcc")  # else CMake looks for it under CUDA's usual places
    steps = [["cmake", "-S", ".", "-B", build, "-DCMAKE_CUDA_ARCHITECTURES=90", "-DCMAKE_BUILD_TYPE=Release",
              *([f"-DCMAKE_CUDA_COMPILER={nvcc}"] if nvcc else [])],
             ["cmake", "--build", build, "-j", str(os.cpu_count() or 1)],
             ["ctest", "--test-dir", build, "--output-on-failure"]]
    for cmd in steps:
        status, _, output = session.run_command(cmd, deadline - time.monotonic(), "install.log")
        if status != 0:
            return {"status": "failed" if status is not None else "stopped",
                    "note": f"{cmd[0]} {cmd[1]}:\n" + _tail(output)}
    passed = [line.strip() for line in output.splitlines() if "tests passed" in line or "Skipped" in line]
    return {"status": "ok", "note": "; ".join(passed) or "ctest passed"}


def _runner(session: Session, limit_s: float, level: str, options: list, methods: Optional[list] = None) -> dict:
    """python -m benchmarks.run --preset gpu-headline --levels LEVEL OPTIONS into --out, relaunched with --resume
    while a call breaks the CUDA context and time is left; then what its rows (of `methods`) came to."""
    deadline = time.monotonic() + limit_s
    relaunches = []
    while True:
        left = deadline - time.monotonic()
        # Its own budget ends early enough for one last measurement and the final write before the hard stop.
        cmd = [session.python, "-m", "benchmarks.run", "--preset", RESULTS, "--out", session.out, "--levels", level,
               "--budget-s", f"{max(5.0, left - 25):.0f}", *options, *(["--resume"] if relaunches else [])]
        status, _, output = session.run_command(cmd, left, "bench.log")
        if status == EXIT_CONTEXT_BROKEN and deadline - time.monotonic() > 30:
            broken = [line for line in output.splitlines() if line.startswith("stopped: the CUDA context")]
            relaunches.append(broken[-1] if broken else "stopped: the CUDA context is broken")
            print(f"  {relaunches[-1]}\n  relaunching with --resume", flush=True)
            continue
        break
    results = _load_results(session)
    rows = [r for r in (results or {}).get(level, []) if methods is None or r["method"] in methods]
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    problems = [f"{r['method']} N={r['seq_len']}{' ' + r['rows'] + ' ' + r['mode'] if level == 'kernel' else ''}: "
                f"{r['status']} {r.get('reason', '')[:150]}" for r in rows if r["status"] in ("error", "OOM")]
    state = {0: "ok", None: "stopped", EXIT_CONTEXT_BROKEN: "context broken"}.get(status, "failed")
    note = f"{level} rows: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")
    if status not in (0, EXIT_CONTEXT_BROKEN):
        note += "\n" + _tail(output)
    if problems:
        note += "\n" + "\n".join("    " + p for p in problems[:12])
    return {"status": state, "note": note, "relaunches": relaunches, "counts": counts}


def kernel(session: Session, limit_s: float) -> dict:
    return _runner(session, limit_s, "kernel", REHEARSE_KERNEL if session.rehearse else [])


def model(session: Session, limit_s: float) -> dict:
    return _runner(session, limit_s, "model", ["--resume", "--model-reps", "2"]
                   + (REHEARSE_MODEL if session.rehearse else []))


def flex(session: Session, limit_s: float) -> dict:
    return _runner(session, limit_s, "kernel", ["--methods", "flex", "--resume"], methods=["flex"])


def tests(session: Session, limit_s: float) -> dict:
    files = ["tests/ops/test_torch_backend.py"] if session.rehearse else TEST_FILES
    record = session.work / "tests.jsonl"
    env = {"ABFT_TEST_TIME_LIMIT_S": str(TEST_TIME_LIMIT_S), "ABFT_TEST_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # xdist workers too
    parallel = ["-n", "8"] if importlib.util.find_spec("xdist") is not None and not session.rehearse else []
    cmd = [session.python, "-m", "pytest", "-p", "benchmarks.pytest_time_limit", "-p", "no:cacheprovider",
           "-o", f"faulthandler_timeout={TEST_TIME_LIMIT_S + 15}", "-q", "-rfE", *parallel, *files,
           *(arg for nodeid in TEST_DESELECT for arg in ("--deselect", nodeid))]
    status, wall, output = session.run_command(cmd, limit_s, "tests.log", env)
    summary = summarise_tests(record)
    summary["deselected"] = TEST_DESELECT
    summary["parallel"] = " ".join(parallel) or "no"
    session.record["tests"] = summary
    counts = summary["counts"]
    state = "stopped" if status is None else "ok" if status == 0 else "failures" if counts.get("failed") else "failed"
    note = ", ".join(f"{n} {s}" for s, n in counts.items()) + f" in {wall:.0f} s (xdist: {summary['parallel']})"
    for failure in summary["failed"][:15]:
        note += f"\n    FAILED {failure['nodeid']}: {failure['message'][:200]}"
    if len(summary["failed"]) > 15:
        note += f"\n    ... and {len(summary['failed']) - 15} more (session.json, tests.log)"
    if summary["unfinished"]:
        note += "\n    still running when stopped: " + ", ".join(summary["unfinished"])
    if not counts or (status not in (0, 1, None)):  # collection errors, a crash: pytest's own words
        note += "\n" + _tail(output)
    return {"status": state, "note": note}


def summarise_tests(record: Path) -> dict:
    """The record of benchmarks/pytest_time_limit.py -> counts per outcome (passed, failed, timed out, skipped,
    unfinished, not run), the failures with their messages, and the tests still running when the run stopped."""
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    collected = next((e["nodeids"] for e in events if e["event"] == "collected"), [])
    outcome, messages, durations = {}, {}, {}
    for e in events:
        if e["event"] == "start":
            outcome.setdefault(e["nodeid"], "unfinished")
        elif e["event"] == "report":
            durations[e["nodeid"]] = durations.get(e["nodeid"], 0) + e["duration"]
            if e["outcome"] == "failed":
                timed_out = "ran past its time limit" in e["message"]
                outcome[e["nodeid"]] = "timed out" if timed_out else "failed"
                messages[e["nodeid"]] = f"({e['when']}) {e['message']}"
            elif e["outcome"] == "skipped" and outcome.get(e["nodeid"]) in (None, "unfinished"):
                outcome[e["nodeid"]] = "skipped"
                messages[e["nodeid"]] = e["message"]
            elif e["when"] == "call" and outcome.get(e["nodeid"]) in (None, "unfinished"):
                outcome[e["nodeid"]] = "passed"
    for nodeid in collected:
        outcome.setdefault(nodeid, "not run")
    counts = {}
    for state in ("passed", "failed", "timed out", "skipped", "unfinished", "not run"):
        n = sum(1 for o in outcome.values() if o == state)
        if n:
            counts[state] = n
    failed = [{"nodeid": n, "outcome": o, "message": messages.get(n, "")} for n, o in outcome.items()
              if o in ("failed", "timed out")]
    skipped = {}
    for n, o in outcome.items():
        if o == "skipped":
            skipped[messages.get(n, "")] = skipped.get(messages.get(n, ""), 0) + 1
    slowest = sorted(durations.items(), key=lambda item: -item[1])[:10]
    return {"counts": counts, "failed": failed, "unfinished": [n for n, o in outcome.items() if o == "unfinished"],
            "skip_reasons": skipped, "slowest_s": dict(slowest), "outcomes": outcome}


STAGES = [
    Stage("environment", 30, 5, False, False, True, environment, "GPU, driver, versions, commit"),
    Stage("install", 170, 60, False, True, False, install,
          "pip install --no-build-isolation --no-deps -e . with the CUDA extension for sm_90"),
    Stage("ctest", 50, 20, False, True, False, ctest, "CMake build of csrc/ for sm_90, ctest"),
    Stage("kernel", 140, 30, True, True, True, kernel, "headline sweep, kernel level"),
    Stage("tests", 170, 50, True, True, True, tests, "kernel tests natively, per-test time limit"),
    Stage("model", 110, 60, True, True, True, model, "Llama-3-8B ABFT training step"),
    Stage("flex", 60, 40, False, True, False, flex, "FlexAttention on the headline shapes"),
]


# ---------------------------------------------------------------------------------------------------------------
# The fused-kernel goals (the fused Triton kernel at Hopper speed), scored on the same run's rows (preset
# gpu-headline: rows "all" R = N, "last" R = 1, "demos" R = N/64, modes fwd and fwd+bwd), each as ratios against sdpa
# in that run.

FUSED_MASS_TOL = 1e-5  # the masses' relative error against the fp32 recompute (benchmarks/kernel_level.py)


def _ratio_checks(kernel: list, rows: str, mode: str, measure: str, goal_at) -> list:
    """(N, met or None, text) per N: triton against sdpa on (rows, mode); measure "tflops" (higher is better, goal:
    ratio >= goal_at(N)) or "median_ms" (lower is better, goal: ratio <= goal_at(N))."""
    checks = []
    for n in goals_module._seq_lens(kernel, rows=rows, mode=mode):
        sdpa, triton = (goals_module._find(kernel, m, rows=rows, mode=mode, seq_len=n) for m in ("sdpa", "triton"))
        missing = [goals_module._why_not(r, m) for r, m in ((sdpa, "sdpa"), (triton, "triton"))
                   if not goals_module._ok(r)]
        if missing:
            checks.append((n, None, "; ".join(missing)))
            continue
        ratio, bound = triton[measure] / sdpa[measure], goal_at(n)
        unit = "TFLOP/s" if measure == "tflops" else "ms"
        met = ratio >= bound if measure == "tflops" else ratio <= bound
        checks.append((n, met, f"triton {triton[measure]:.3g} vs sdpa {sdpa[measure]:.3g} {unit} = {ratio:.2f}x "
                               f"(goal {'>=' if measure == 'tflops' else '<='} {bound:.2f}x)"))
    return checks


def fused_mass_error(kernel: list) -> dict:
    checks = []
    for n in goals_module._seq_lens(kernel, method="triton", mode="fwd"):
        errors = [(r["rows"], r["mass_rel_err"]) for r in kernel if r["method"] == "triton" and r["mode"] == "fwd"
                  and r["seq_len"] == n and goals_module._ok(r) and r.get("mass_rel_err") is not None]
        if not errors:
            checks.append((n, None, "no triton forward row with a mass error"))
            continue
        worst_rows, worst = max(errors, key=lambda e: e[1])
        checks.append((n, worst < FUSED_MASS_TOL, f"worst triton mass rel. err. {worst:.2g} (rows {worst_rows}; "
                                                  f"goal < {FUSED_MASS_TOL:g})"))
    return goals_module._verdict("triton masses within 1e-5 relative of the fp32 recompute", checks)


def demos_regime(kernel: list) -> dict:
    """R = N/64 forward + backward: triton and torch against sdpa, the numbers that place the boundary between auto's
    few-rows and many-rows regimes (no threshold: met when measured)."""
    checks = []
    for n in goals_module._seq_lens(kernel, rows="demos", mode="fwd+bwd"):
        sdpa = goals_module._find(kernel, "sdpa", rows="demos", mode="fwd+bwd", seq_len=n)
        ours = {m: goals_module._find(kernel, m, rows="demos", mode="fwd+bwd", seq_len=n) for m in ("triton", "torch")}
        if not goals_module._ok(sdpa) or not any(goals_module._ok(r) for r in ours.values()):
            why = [goals_module._why_not(r, m) for m, r in {"sdpa": sdpa, **ours}.items() if not goals_module._ok(r)]
            checks.append((n, None, "; ".join(why)))
            continue
        parts = [f"{m} {r['median_ms'] / sdpa['median_ms']:.2f}x" for m, r in ours.items() if goals_module._ok(r)]
        checks.append((n, True, "vs sdpa: " + ", ".join(parts) + f" (sdpa {sdpa['median_ms']:.3g} ms)"))
    return goals_module._verdict("R=N/64 fwd+bwd: triton and torch against sdpa (the regime boundary)", checks)


def fused_goals(results: dict) -> list:
    """The fused-kernel goals, each {"goal", "status", "details"} as in scripts/performance_goals.py."""
    kernel = results.get("kernel", [])
    return [
        goals_module._verdict("R=N fwd: triton >= 0.7x sdpa TFLOP/s",
                              _ratio_checks(kernel, "all", "fwd", "tflops", lambda n: 0.7)),
        goals_module.rn_triton_vs_onehot(kernel),
        goals_module._verdict("R=N fwd+bwd: triton >= 0.6x sdpa TFLOP/s",
                              _ratio_checks(kernel, "all", "fwd+bwd", "tflops", lambda n: 0.6)),
        goals_module._verdict("R=1 fwd+bwd: triton <= 1.3x sdpa's time at N=2048, <= 1.1x from N=8192",
                              _ratio_checks(kernel, "last", "fwd+bwd", "median_ms",
                                            lambda n: 1.3 if n < 8192 else 1.1)),
        fused_mass_error(kernel),
        demos_regime(kernel),
    ]


def _load_results(session: Session) -> Optional[dict]:
    path = session.out / f"{RESULTS}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def update_results(session: Session) -> Optional[dict]:
    """Goals into session.json; goals and the stages into gpu-headline.json and .md (when the runner wrote one)."""
    results = _load_results(session)
    session.record["goals"] = goals_module.evaluate(results or {})
    session.record["fused_goals"] = fused_goals(results or {})
    session.write()
    if results is None:
        return None
    results["goals"] = session.record["goals"]
    results["fused_goals"] = session.record["fused_goals"]
    results["session"] = {k: session.record.get(k) for k in ("command", "started", "budget_s", "stages")}
    results["session"]["tests"] = {k: (session.record["tests"] or {}).get(k) for k in ("counts", "failed")}
    report.write_json(results, session.out)
    (session.out / f"{RESULTS}.md").write_text(markdown(session, results))
    return results


def markdown(session: Session, results: dict) -> str:
    rehearsal = " (a rehearsal on CPU: tiny shapes, the numbers mean nothing)" if session.rehearse else ""
    lines = [f"# GPU session: {results['environment']['device']}{rehearsal}", "",
             f"`{session.record['command']}` started {session.record['started']}, budget {session.budget_s:g} s.",
             "", "## Goals (GPU headline)", "", goals_module.markdown(session.record["goals"]), "",
             "## Goals (the fused kernel)", "", goals_module.markdown(session.record["fused_goals"]), "",
             "## Stages", "", "| stage | budget s | used s | status | note |", "|---|---|---|---|---|"]
    for s in session.record["stages"]:
        note = s["note"].replace("\n", "<br>").replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['budget_s']:.0f} | {s['used_s']:.0f} | {s['status']} | {note} |")
    return "\n".join(lines) + "\n\n" + report.markdown(results)


def stage_table(session: Session) -> str:
    lines = [f"{'stage':<12}{'budget s':>9}{'used s':>8}  status"]
    for s in session.record["stages"]:
        first = s["note"].splitlines()[0] if s["note"] else ""
        lines.append(f"{s['name']:<12}{s['budget_s']:>9.0f}{s['used_s']:>8.0f}  {s['status']}: {first[:110]}")
    return "\n".join(lines)


def run_stage(session: Session, index: int) -> None:
    stage = STAGES[index]
    left = session.budget_s - session.elapsed() - FINAL_RESERVE_S
    runs_here = [s for s in STAGES[index + 1:]
                 if s.name in session.stages and (session.gpu or (session.rehearse and s.rehearsed))]
    reserve = sum(s.min_s for s in runs_here if s.reserved)
    limit = max(0.0, min(stage.cap_s, left - reserve))
    entry = {"name": stage.name, "what": stage.what, "budget_s": limit, "used_s": 0.0, "status": "running", "note": ""}
    session.record["stages"].append(entry)
    print(f"\n== {stage.name}: {stage.what} (budget {limit:.0f} s of at most {stage.cap_s:.0f}; "
          f"{session.elapsed():.0f} s of {session.budget_s:.0f} s gone)", flush=True)
    if stage.name not in session.stages:
        entry.update(status="skipped", note="not among --stages")
    elif stage.needs_gpu and not session.gpu and not (session.rehearse and stage.rehearsed):
        entry.update(status="skipped", note="no CUDA GPU visible" + (
            "" if session.rehearse else " (a dry run; --rehearse runs the kernel, tests and model stages on CPU)"))
    elif limit < stage.min_s:
        entry.update(status="skipped", note=f"it needs at least {stage.min_s:.0f} s and {limit:.0f} s are left "
                                            f"(after {reserve:.0f} s kept for the later stages)")
    else:
        session.write()
        start = time.monotonic()
        try:
            entry.update(stage.run(session, limit))
        except Exception as error:  # a bug in one stage must not cost the stages after it
            entry.update(status="crashed", note=f"{type(error).__name__}: {error}")
        entry["used_s"] = round(time.monotonic() - start, 1)
    print(f"   {entry['status']}: {entry['note']}", flush=True)
    try:
        update_results(session)
    except Exception as error:  # the stages after this one still run; their results are written again after them
        print(f"   could not write the results and goals: {type(error).__name__}: {error}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bash scripts/gpu_session.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where everything is written (at most 8 files)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="wall time for all stages, in seconds (default 540: 9 minutes)")
    parser.add_argument("--rehearse", action="store_true",
                        help="without a GPU, run the kernel, tests and model stages on tiny CPU shapes")
    parser.add_argument("--python", default=sys.executable, help="the Python that installs and runs everything")
    names = [s.name for s in STAGES]
    parser.add_argument("--stages", nargs="+", choices=names, default=names,
                        help="run only these stages (a short rerun; environment always runs). Default: all")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args.out.resolve(), args.budget_s, args.python, args.rehearse, ["environment", *args.stages])
    caps = ", ".join(f"{s.name} <= {s.cap_s:.0f}" for s in STAGES)
    print(f"GPU session: budget {args.budget_s:.0f} s for all stages, each at most: {caps} s "
          f"(and never more than is left; later stages keep their minimum). Writing to {session.out}", flush=True)
    for index in range(len(STAGES)):
        run_stage(session, index)
    results = update_results(session) or {"kernel": [], "model": []}
    files = sorted(p.name for p in session.out.iterdir())
    session.record["files"] = files
    session.record["wall_s"] = round(session.elapsed(), 1)
    session.write()
    shutil.rmtree(session.work, ignore_errors=True)
    print(f"\n== done in {session.elapsed():.0f} s of {session.budget_s:.0f} s; files in {session.out}: "
          f"{', '.join(files)}" + (f" (more than the {MAX_FILES} the device tool brings back!)"
                                   if len(files) > MAX_FILES else ""))
    print("\n" + stage_table(session))
    summary = report.summary(results)
    if summary:
        print("\n" + summary)
    rehearsal = " (a rehearsal on CPU: tiny shapes, the numbers mean nothing)" if session.rehearse else ""
    print(f"\nGoals (GPU headline){rehearsal}:\n" + goals_module.text(session.record["goals"]))
    print(f"\nGoals (the fused kernel){rehearsal}:\n" + goals_module.text(session.record["fused_goals"]),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
