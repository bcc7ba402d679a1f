"""Benchmark runner: `python -m benchmarks.run [--quick]` (or `abft bench`); see benchmarks/README.md.

Sweeps the kernel-level shapes and the model-level prompt lengths, writes <mode>.json, <mode>.md and
PNG plots to benchmarks/results/<device>/ and prints a short table. Every failure (out of memory,
a method that cannot run here) is recorded in the results; none stops the run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from . import kernel_level, model_level, report
from .methods import METHODS
from .shapes import DTYPES, ROW_SETS, kernel_shapes
from .timing import Timing, device_slug, guarded

MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few repetitions, SmolLM2-135M at N=256: a CPU smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    parser.add_argument("--levels", nargs="+", choices=("kernel", "model"), default=["kernel", "model"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="kernel-level methods")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: float16 bfloat16 (quick: bfloat16)")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=None, help="kernel-level N (default: 512..65536)")
    parser.add_argument("--rows", nargs="+", choices=ROW_SETS, default=list(ROW_SETS))
    parser.add_argument("--heads", nargs=3, type=int, metavar=("HQ", "HKV", "D"), default=None,
                        help="kernel-level head counts and head dim (default: 32 8 128; quick: 4 2 32)")
    parser.add_argument("--batch", type=int, default=None,
                        help="kernel-level batch size (default: max(1, 16384 // N); quick: 1)")
    parser.add_argument("--models", nargs="+", choices=list(model_level.MODEL_CONFIGS), default=None,
                        help="default: llama-3.2-1b llama-3-8b on CUDA, smollm2-135m on CPU")
    parser.add_argument("--model-methods", nargs="+", choices=list(model_level.MODEL_METHODS),
                        default=list(model_level.MODEL_METHODS))
    parser.add_argument("--model-seq-lens", nargs="+", type=int, default=None, help="default: 512..32768 (quick: 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--isolate", action="store_true",
                        help="run every model-level point (model, N, method) in a fresh Python process, so that its "
                             "peak resident memory (peak_rss_gib) is its own; each finished point is appended to "
                             "<out>/<name>.points.jsonl and not measured again by a later run with the same --name")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="with --isolate: glibc's MALLOC_MMAP_THRESHOLD_ for the points' processes (e.g. 131072: "
                             "every larger block is mapped and unmapped, so resident memory follows the live tensors "
                             "instead of the allocator's history; default: glibc's dynamic threshold)")
    parser.add_argument("--model-reps", type=int, default=None,
                        help="timed model steps per point after the warm-up step (default: 3; quick: 1)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="skip eager attention where its memory estimate exceeds this (default: 90%% of the "
                             "device's memory)")
    parser.add_argument("--name", default=None,
                        help="results file name: <name>.json/.md/_*.png (default: full, or quick)")
    parser.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)  # --isolate's children
    return parser.parse_args(argv)


def run_kernel_level(args, shapes: list, device: torch.device, timing: Timing) -> list:
    rows = []
    methods = [METHODS[name] for name in args.methods]
    for shape in shapes:
        ref_mass = None
        if "fwd" in args.modes:
            ref_mass = guarded(lambda: {"mass": kernel_level.reference_mass(shape, device)}, device).get("mass")
        for mode in args.modes:
            for method in methods:
                row = kernel_level.measure_kernel(method, shape, device, mode == "fwd+bwd", timing, ref_mass)
                _progress(row, f"kernel {mode} {shape.dtype} N={shape.seq_len} rows={shape.rows}")
                rows.append(row)
        del ref_mass
    return rows


def run_model_level(args, seq_lens: list, device: torch.device, points_path: Optional[Path] = None) -> list:
    rows = []
    names = args.models or (model_level.CPU_MODELS if args.quick or device.type == "cpu"
                            else model_level.FULL_GPU_MODELS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.model_reps or (1 if args.quick else 3)
    limit = None if args.memory_limit_gib is None else args.memory_limit_gib * 2 ** 30
    methods = [model_level.MODEL_METHODS[name] for name in args.model_methods]
    for name in names:
        if args.isolate:
            points = (_isolated_point(args, name, seq_len, method.name, reps, points_path)
                      for seq_len in seq_lens for method in methods)
        else:
            points = model_level.sweep_model(name, methods, seq_lens, device, dtype, reps, limit)
        for row in points:
            if not (args.isolate or args.child_json) and "peak_rss_gib" in row:
                row["peak_rss_gib"] = None  # the peak of a process that ran other points too: not this point's
            _progress(row, f"model {name} N={row['seq_len']}")
            rows.append(row)
    return rows


def _isolated_point(args, name: str, seq_len: int, method: str, reps: int, points_path: Path) -> dict:
    """The point's row from points_path when an earlier run measured it, else measured now and appended there."""
    if points_path.is_file():
        for line in points_path.read_text().splitlines():
            row = json.loads(line)
            if (row["model"], row["seq_len"], row["method"]) == (name, seq_len, method):
                return row
    row = _run_isolated(args, name, seq_len, method, reps)
    points_path.parent.mkdir(parents=True, exist_ok=True)
    with points_path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _run_isolated(args, name: str, seq_len: int, method: str, reps: int) -> dict:
    """One model-level point in a fresh `python -m benchmarks.run` process; a process that dies (e.g. killed for
    memory) gives a row with status OOM (SIGKILL) or error."""
    command = [sys.executable, "-m", "benchmarks.run", "--levels", "model", "--device", args.device,
               "--models", name, "--model-methods", method, "--model-seq-lens", str(seq_len),
               "--model-reps", str(reps)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.memory_limit_gib is not None:
        command += ["--memory-limit-gib", str(args.memory_limit_gib)]
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        done = subprocess.run(command + ["--child-json", str(path)], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, env=env)
        if done.returncode == 0:
            return json.loads(path.read_text())[0]
    status = "OOM" if done.returncode == -9 else "error"
    tail = (done.stderr.strip().splitlines() or [""])[-1][:300]
    return {"level": "model", "model": name, "method": method, "backend": None, "backend_reason": None,
            "seq_len": seq_len, "batch": 1, "status": status,
            "reason": f"the point's process exited with {done.returncode}: {tail}"}


def _progress(row: dict, where: str) -> None:
    detail = f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']} {row.get('reason', '')}"
    print(f"{where} {row['method']}: {detail}", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    timing = Timing(warmup=1, reps=3) if args.quick else Timing()
    # Sizes are checked before anything runs, so a bad one cannot stop the run half way.
    shapes = kernel_shapes(args.quick, args.dtypes, args.seq_lens, args.rows, args.heads, args.batch)
    model_seq_lens = args.model_seq_lens or (model_level.QUICK_SEQ_LENS if args.quick else model_level.FULL_SEQ_LENS)
    if min(model_seq_lens) <= model_level.DEMO_LEN:
        raise ValueError(f"--model-seq-lens must exceed the demonstration length {model_level.DEMO_LEN}")
    if args.child_json is not None:  # one isolated point: its rows only, no report
        args.child_json.write_text(json.dumps(run_model_level(args, model_seq_lens, device)))
        return {}
    mode = args.name or ("quick" if args.quick else "full")
    out_dir = args.out or Path(__file__).resolve().parent / "results" / device_slug(device)
    results = {
        "mode": mode,
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv),
        "environment": report.environment(device),
        "conventions": report.CONVENTIONS,
        "methods": {
            **{m.name: {"level": "kernel", "description": m.description, "computes_masses": m.computes_masses}
               for m in METHODS.values()},
            **{f"model/{m.name}": {"level": "model", "description": m.description,
                                   "computes_masses": m.computes_masses}
               for m in model_level.MODEL_METHODS.values()},
        },
        "kernel": run_kernel_level(args, shapes, device, timing) if "kernel" in args.levels else [],
        "model": run_model_level(args, model_seq_lens, device, out_dir / f"{mode}.points.jsonl")
        if "model" in args.levels else [],
    }
    written = report.write(results, out_dir)
    print()
    print(report.summary(results))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    main()
