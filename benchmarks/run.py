"""Benchmark runner: `python -m benchmarks.run [--quick | --preset gpu-headline]` (or `abft bench`); see its README.

Sweeps the kernel-level shapes and the model-level prompt lengths, writes <mode>.json, <mode>.md and
PNG plots to benchmarks/results/<device>/ and prints a short table. Every failure (out of memory,
a method that cannot run here) is recorded in the results; none stops the run. The JSON is rewritten
after every measurement, so a run that is killed keeps what it measured, and --resume continues it.
With --isolate every model-level point runs in a fresh process (its peak resident memory is its own).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from . import kernel_level, model_level, report
from .methods import METHODS
from .shapes import DTYPES, ROW_SETS, kernel_shapes
from .timing import EXIT_CONTEXT_BROKEN, Timing, cuda_context_error, device_slug, guarded

MODES = ("fwd", "fwd+bwd")
BUDGET_REASON = "not run: the time budget (--budget-s {:g}) was spent"  # --resume measures these rows again
# The fields that identify a result row (two rows with the same ones are the same measurement).
ROW_KEYS = {
    "kernel": ("method", "mode", "dtype", "rows", "seq_len", "batch", "heads", "kv_heads", "head_dim",
               "num_classes", "demo_len"),
    "model": ("model", "method", "seq_len", "batch", "dtype", "num_layers", "gradient_checkpointing"),
}

# Option values that a preset sets where the command line gives none. Order of the runs: `priority`
# lists (rows, mode) groups measured first, in that order; plots=False writes no PNG files.
DEFAULTS = dict(levels=["kernel", "model"], methods=list(METHODS), modes=list(MODES), rows=list(ROW_SETS),
                model_methods=list(model_level.MODEL_METHODS), plots=True, priority=None)
PRESETS = {
    # The headline on one GPU: Llama-3-8B attention in bf16, the rows that its goals need first
    # (R = 1 forward + backward, then R = N forward). flex is left out (its compiles take minutes): add it
    # with --methods flex.
    "gpu-headline": dict(
        levels=["kernel", "model"], dtypes=["bfloat16"], seq_lens=[2048, 8192, 32768], rows=["last", "all", "demos"],
        modes=list(MODES), methods=["sdpa", "triton", "cuda", "torch", "sdpa_onehot", "eager"],
        models=["llama-3-8b"], model_seq_lens=[4096, 32768], model_methods=["eager", "sdpa", "abft"],
        # "demos" (R = N/64, a point between auto's two regimes) last: measured when the budget allows.
        plots=False, priority=[("last", "fwd+bwd"), ("all", "fwd"), ("last", "fwd"), ("all", "fwd+bwd"),
                               ("demos", "fwd+bwd")],
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few repetitions, SmolLM2-135M at N=256: a CPU smoke test")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="gpu-headline: the GPU headline sweep (bf16 Llama-3-8B attention, N=2048/8192/32768, "
                             "rows last and all, then demos (R=N/64) fwd+bwd; Llama-3-8B steps at N=4096/32768), written as gpu-headline.json/.md; "
                             "options given explicitly override it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    parser.add_argument("--levels", nargs="+", choices=("kernel", "model"), default=None)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                        help="kernel-level methods (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: float16 bfloat16 (quick: bfloat16)")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=None, help="kernel-level N (default: 512..65536)")
    parser.add_argument("--rows", nargs="+", choices=ROW_SETS, default=None)
    parser.add_argument("--heads", nargs=3, type=int, metavar=("HQ", "HKV", "D"), default=None,
                        help="kernel-level head counts and head dim (default: 32 8 128; quick: 4 2 32)")
    parser.add_argument("--batch", type=int, default=None,
                        help="kernel-level batch size (default: max(1, 16384 // N); quick: 1)")
    parser.add_argument("--models", nargs="+", choices=list(model_level.MODEL_CONFIGS), default=None,
                        help="default: llama-3.2-1b llama-3-8b on CUDA, smollm2-135m on CPU")
    parser.add_argument("--model-methods", nargs="+", choices=list(model_level.MODEL_METHODS), default=None)
    parser.add_argument("--model-seq-lens", nargs="+", type=int, default=None, help="default: 512..32768 (quick: 256)")
    parser.add_argument("--model-layers", type=int, default=None,
                        help="keep only the first layers of each model (default: all; the results say so)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="model level: gradient checkpointing of every layer (default: on CUDA only)")
    parser.add_argument("--model-reps", type=int, default=None, help="timed steps per model row (default: 3; quick: 1)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="skip eager attention where its memory estimate exceeds this (default: 90%% of the "
                             "device's memory)")
    parser.add_argument("--isolate", action="store_true",
                        help="run every model-level point (model, N, method) in a fresh Python process, so that its "
                             "peak resident memory (peak_rss_gib) is its own; each finished point is also appended "
                             "to <out>/<name>.points.jsonl and not measured again by a later run with the same name")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="with --isolate: glibc's MALLOC_MMAP_THRESHOLD_ for the points' processes (e.g. 131072: "
                             "every larger block is mapped and unmapped, so resident memory follows the live tensors "
                             "instead of the allocator's history; default: glibc's dynamic threshold)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no measurement after this many seconds; the rest is recorded as skipped")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of <out>/<mode>.json and measure only the missing ones (and those "
                             "skipped for time); methods that broke the CUDA context there are not run again")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None, help="write PNG plots")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--name", default=None,
                        help="results file name: <name>.json/.md/_*.png (default: the preset's name, else full or "
                             "quick)")
    parser.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)  # --isolate's children
    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model_layers is not None and args.model_layers < 1:
        parser.error("--model-layers must be at least 1")
    if args.model_reps is not None and args.model_reps < 1:
        parser.error("--model-reps must be at least 1")
    if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
        parser.error("--memory-limit-gib must be positive")
    if args.model_reps is None:
        args.model_reps = 1 if args.quick else 3
    return args


class ContextBroken(Exception):
    """A call left the CUDA context unusable: nothing more can be measured in this process."""


class Book:
    """The rows of a run as they come: each is printed and <out>/<mode>.json rewritten after it. Knows the
    time budget, the methods that broke the CUDA context, and with resume the rows of an earlier run."""

    def __init__(self, results: dict, out_dir: Path, device: torch.device, budget_s: Optional[float], resume: bool):
        self.results, self.out_dir, self.device, self.budget_s = results, out_dir, device, budget_s
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        results.setdefault("broken_methods", {})
        self.done_keys = set()
        path = out_dir / f"{results['mode']}.json"
        if resume and path.is_file():
            earlier = json.loads(path.read_text())
            results["commands"] = earlier.get("commands", [earlier["command"]]) + [results["command"]]
            results["broken_methods"].update(earlier.get("broken_methods", {}))
            for level in ROW_KEYS:  # rows skipped for time stay until a measurement replaces them
                results[level] = earlier.get(level, []) + results[level]
                self.done_keys |= {row_key(r) for r in results[level] if not _budget_skipped(r)}

    def done(self, row: dict) -> bool:
        return row_key(row) in self.done_keys

    def not_run(self, row: dict) -> Optional[dict]:
        """The status and reason of a row that is not to be measured, or None."""
        broken = self.results["broken_methods"].get(f"{row['level']}/{row['method']}")
        if broken is not None:
            return {"status": "error", "reason": f"not run: an earlier call of this method broke the CUDA context "
                                                 f"({broken})"}
        if self.deadline is not None and time.monotonic() > self.deadline:
            return {"status": "skipped", "reason": BUDGET_REASON.format(self.budget_s)}
        return None

    def add(self, row: dict, where: str) -> None:
        rows = self.results[row["level"]]
        same = [i for i, earlier in enumerate(rows) if row_key(earlier) == row_key(row)]
        if same:  # a row that an earlier run skipped for time
            rows[same[0]] = row
        else:
            rows.append(row)
        _progress(row, where)
        broken = cuda_context_error(self.device) if row["status"] in ("error", "OOM") else None
        if broken is not None:
            self.results["broken_methods"][f"{row['level']}/{row['method']}"] = row["reason"]
            self.results["context_broken"] = f"{where} {row['method']}: {row['reason']} (then: {broken})"
        report.write_json(self.results, self.out_dir)
        if broken is not None:
            raise ContextBroken(self.results["context_broken"])


def row_key(row: dict) -> tuple:
    """The fields that identify a result row's measurement (ROW_KEYS), with its level."""
    return (row["level"],) + tuple(row.get(k) for k in ROW_KEYS[row["level"]])


def _budget_skipped(row: dict) -> bool:
    return row["status"] == "skipped" and row.get("reason", "").startswith(BUDGET_REASON.split("(")[0])


def kernel_plan(shapes: list, modes: list, methods: list, priority: Optional[list] = None) -> list:
    """(shape, mode, method) in the order they are measured: shape by shape, mode by mode, method by method;
    with a priority list of (rows, mode) groups, those groups first and in that order (each in that order)."""
    items = [(shape, mode, method) for shape in shapes for mode in modes for method in methods]
    if priority is None:
        return items
    rank = {tuple(group): i for i, group in enumerate(priority)}
    return sorted(items, key=lambda item: rank.get((item[0].rows, item[1]), len(rank)))


def run_kernel_level(args, shapes: list, device: torch.device, timing: Timing, book: Book) -> None:
    ref_masses = {}  # shape -> exact fp32 masses (None when computing them failed), computed when first needed
    for shape, mode, method in kernel_plan(shapes, args.modes, [METHODS[m] for m in args.methods], args.priority):
        backward = mode == "fwd+bwd"
        where = f"kernel {mode} {shape.dtype} N={shape.seq_len} rows={shape.rows}"
        row = kernel_level.kernel_row(method, shape, backward)
        if book.done(row):
            continue
        reason = book.not_run(row)
        if reason is not None:
            book.add({**row, **reason}, where)
            continue
        start = time.monotonic()
        if not backward and method.computes_masses and method.unavailable(device, backward) is None:
            if shape not in ref_masses:
                ref_masses[shape] = guarded(lambda: {"mass": kernel_level.reference_mass(shape, device)},
                                            device).get("mass")
        row = kernel_level.measure_kernel(method, shape, device, backward, timing, ref_masses.get(shape))
        book.add({**row, "wall_s": round(time.monotonic() - start, 1)}, where)


def model_sweep(args, name: str, seq_lens: list, device: torch.device, **hooks):
    """model_level.sweep_model of model `name` with the options of args; hooks: its done, not_run and measure."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    limit = None if args.memory_limit_gib is None else args.memory_limit_gib * 2 ** 30
    methods = [model_level.MODEL_METHODS[m] for m in args.model_methods]
    return model_level.sweep_model(name, methods, seq_lens, device, dtype, args.model_reps, limit, args.model_layers,
                                   checkpointing=args.gradient_checkpointing, **hooks)


def run_model_level(args, seq_lens: list, device: torch.device, book: Book) -> None:
    names = args.models or (model_level.CPU_MODELS if args.quick or device.type == "cpu"
                            else model_level.FULL_GPU_MODELS)
    points_path = book.out_dir / f"{book.results['mode']}.points.jsonl"
    measure = (lambda row: isolated_point(args, row, points_path)) if args.isolate else None
    for name in names:
        start = time.monotonic()
        for row in model_sweep(args, name, seq_lens, device, done=book.done, not_run=book.not_run, measure=measure):
            if not args.isolate and "peak_rss_gib" in row:
                row["peak_rss_gib"] = None  # the peak of a process that ran other points too: not this point's
            row.setdefault("wall_s", round(time.monotonic() - start, 1))  # an isolated point has its process's
            book.add(row, f"model {name} N={row['seq_len']}")
            start = time.monotonic()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def isolated_point(args, row: dict, points_path: Path) -> dict:
    """The measured row of model-level point `row` (its fields before measuring): the one in points_path when an
    earlier run measured it, else measured now in a fresh process (isolated_run) and appended there."""
    if points_path.is_file():
        for line in points_path.read_text().splitlines():
            earlier = json.loads(line)
            if row_key(earlier) == row_key(row):
                return earlier
    start = time.monotonic()
    measured = {**row, **isolated_run(args, row), "wall_s": round(time.monotonic() - start, 1)}
    points_path.parent.mkdir(parents=True, exist_ok=True)
    with points_path.open("a") as f:
        f.write(json.dumps(measured) + "\n")
    return measured


def isolated_run(args, row: dict) -> dict:
    """The result fields of model-level point `row`, measured in a fresh `python -m benchmarks.run --child-json`
    process; a process that dies (e.g. killed for memory) gives status OOM (SIGKILL) or error and the reason."""
    command = [sys.executable, "-m", "benchmarks.run", "--levels", "model", "--device", args.device,
               "--models", row["model"], "--model-methods", row["method"], "--model-seq-lens", str(row["seq_len"]),
               "--model-reps", str(args.model_reps)]
    for option, value in (("--threads", args.threads), ("--memory-limit-gib", args.memory_limit_gib),
                          ("--model-layers", args.model_layers)):
        if value is not None:
            command += [option, str(value)]
    if args.gradient_checkpointing is not None:
        command.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
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
    return {"status": status, "reason": f"the point's process exited with {done.returncode}: {tail}"}


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
    if args.child_json is not None:  # one --isolate point, measured in this process: its row only, no report
        rows = list(model_sweep(args, args.models[0], model_seq_lens, device))
        args.child_json.write_text(json.dumps(rows))
        return {}
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = {
        "mode": args.name or args.preset or ("quick" if args.quick else "full"),
        "quick": args.quick,
        "command": command,
        "commands": [command],
        "environment": report.environment(device),
        "conventions": report.CONVENTIONS,
        "methods": {
            **{m.name: {"level": "kernel", "description": m.description, "computes_masses": m.computes_masses}
               for m in METHODS.values()},
            **{f"model/{m.name}": {"level": "model", "description": m.description,
                                   "computes_masses": m.computes_masses}
               for m in model_level.MODEL_METHODS.values()},
        },
        "kernel": [],
        "model": [],
    }
    out_dir = args.out or Path(__file__).resolve().parent / "results" / device_slug(device)
    book = Book(results, out_dir, device, args.budget_s, args.resume)
    try:
        if "kernel" in args.levels:
            run_kernel_level(args, shapes, device, timing, book)
        if "model" in args.levels:
            run_model_level(args, model_seq_lens, device, book)
    except ContextBroken as broken:
        print(f"\nstopped: the CUDA context is broken after {broken}; rerun with --resume for the rest", flush=True)
    written = report.write(results, out_dir, plots=args.plots)
    print()
    print(report.summary(results))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    sys.exit(EXIT_CONTEXT_BROKEN if main().get("context_broken") else 0)
