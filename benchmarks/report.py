"""What a run records about itself, and its results as JSON, markdown tables and PNG plots."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from .timing import device_name, device_slug

ROOT = Path(__file__).resolve().parents[1]
CONVENTIONS = {
    "time": "median ms; CUDA: triton.testing.do_bench (CUDA events, L2 flushed, warm-up excluded); "
            "CPU: median wall time after warm-up calls",
    "tflops": "4*B*Hq*N^2*D/2 (causal attention) per forward, 3.5x that for forward+backward, for every method "
              "(the label masses are not counted)",
    "peak_memory_gib": "torch.cuda.max_memory_allocated during one call, inputs (model: weights) included; "
                       "null on CPU (not measured)",
    "mass_rel_err": "||mass - exact|| / ||exact|| (or 'non-finite'), exact = fp32 masses of the same rounded "
                    "inputs from the row recompute of backend 'torch'; forward only",
    "model step": "forward with output_attentions, abft_loss, backward, zero_grad; median of the timed steps "
                  "after one warm-up step; W_Q and W_K trainable, no optimizer step, no LM head",
    "peak_rss_gib": "model level: the peak resident memory (ru_maxrss) of the process that ran the point, with "
                    "--isolate a fresh one per point (Python, torch and the weights included); null otherwise",
    "saved_gib": "model level: the storages autograd keeps for backward from the warm-up step's forward and loss, "
                 "each counted once (weights included)",
    "status": "ok | OOM (ran out of memory) | skipped (a size estimate said it cannot fit, or the run's time "
              "budget was spent) | unavailable (cannot run here; see reason) | error (see reason)",
    "wall_s": "wall time of the whole measurement (building, warm-up, compiles, timing), for planning runs",
}


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device), "device_slug": device_slug(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "transformers": _version("transformers"), "flash_attn": _version("flash-attn"),
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine makes CPU timings noisy
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # ABFT_COMMIT names the commit of a copied tree (a device machine's), whose .git may be missing or stale.
        "commit": os.environ.get("ABFT_COMMIT") or (commit and commit + ("-dirty" if dirty else "")),
    }


def _cell(row: dict, key: str, fmt: str) -> str:
    if row["status"] != "ok":
        return "n/a" if row["status"] == "unavailable" else row["status"]
    value = row.get(key)
    if value is None or isinstance(value, str):
        return "n/a" if value is None else value
    return format(value, fmt)


def _table(rows: list, columns: list, key: str, fmt: str) -> list:
    """Markdown lines: one line per N (with its batch size), one column per method."""
    lines = ["| N | batch | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for seq_len in sorted({r["seq_len"] for r in rows}):
        by_method = {r["method"]: r for r in rows if r["seq_len"] == seq_len}
        cells = [_cell(by_method[m], key, fmt) if m in by_method else "" for m in columns]
        batch = next(iter(by_method.values()))["batch"]
        lines.append(f"| {seq_len} | {batch} | " + " | ".join(cells) + " |")
    return lines


def _methods_run(rows: list) -> list:
    """The methods of rows that could run here (the others are listed once, with their reason)."""
    return list(dict.fromkeys(r["method"] for r in rows if r["status"] != "unavailable"))


def _kernel_groups(rows: list):
    """(dtype, row set, mode) -> rows, in sweep order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["rows"], r["mode"]), []).append(r)
    return groups


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# label_attention benchmarks: {env['device']} ({results['mode']} mode)", ""]
    if results.get("quick", results["mode"] == "quick"):
        lines += ["Quick mode: tiny shapes and few repetitions, a smoke test of the suite. These numbers say "
                  "nothing about large shapes or GPUs.", ""]
    commands = results.get("commands", [results["command"]])
    if len(commands) > 1:
        lines += ["Commands (each later one resumed the results of those before it):", ""]
        lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)] + [""]
    else:
        lines += [f"Command: `{results['command']}`", ""]
    lines += ["| " + " | ".join(env) + " |", "|---" * len(env) + "|",
              "| " + " | ".join(str(v) for v in env.values()) + " |", ""]
    if results.get("note"):  # written by hand into the JSON, e.g. where a file's points came from
        lines += [f"Note: {results['note']}", ""]
    lines += ["Conventions:", ""] + [f"* {k}: {v}" for k, v in results["conventions"].items()] + [""]
    lines += ["Methods:", ""] + [f"* `{name}`: {m['description']}" for name, m in results["methods"].items()] + [""]
    reasons = {(r["method"], r["reason"]) for r in results["kernel"] if r["status"] == "unavailable"}
    reasons |= {("model/" + r["method"], r["reason"]) for r in results["model"] if r["status"] == "unavailable"}
    if reasons:
        lines += ["Not run here:", ""] + [f"* `{m}`: {reason}" for m, reason in sorted(reasons)] + [""]

    for (dtype, row_set, mode), rows in _kernel_groups(results["kernel"]).items():
        methods = _methods_run(rows)
        shape = rows[0]
        lines += [f"## Kernel, {mode}, {dtype}, rows = {row_set} (Hq={shape['heads']}, Hkv={shape['kv_heads']}, "
                  f"D={shape['head_dim']}, C={shape['num_classes']}, a label every {shape['demo_len']} tokens)",
                  "", "Median time, ms:", ""] + _table(rows, methods, "median_ms", ".3g")
        lines += ["", "TFLOP/s:", ""] + _table(rows, methods, "tflops", ".3g")
        if any(r.get("peak_memory_gib") is not None for r in rows):
            lines += ["", "Peak memory, GiB:", ""] + _table(rows, methods, "peak_memory_gib", ".3g")
        if mode == "fwd":
            mass_methods = [m for m in methods if results["methods"][m]["computes_masses"]]
            lines += ["", "Mass relative error:", ""] + _table(rows, mass_methods, "mass_rel_err", ".1e")
        lines.append("")

    models = {}  # a table per model and checkpointing setting
    for r in results["model"]:
        models.setdefault((r["model"], r["gradient_checkpointing"]), []).append(r)
    for (model, _), rows in models.items():
        methods = _methods_run(rows)
        layers = rows[0].get("num_layers"), rows[0].get("model_num_layers")
        fewer = f", its first {layers[0]} of {layers[1]} layers" if layers[0] != layers[1] else ""
        lines += [f"## Model, {model}{fewer}, one ABFT step (forward, abft_loss, backward), {rows[0]['dtype']}, "
                  f"gradient checkpointing {rows[0]['gradient_checkpointing']}", ""]
        backends = dict.fromkeys(f"{r['method']} → {r['backend']}" for r in rows if r["backend"] is not None)
        lines += ["label_attention backend: " + ", ".join(backends), "", "Median step time, ms:", ""]
        lines += _table(rows, methods, "median_ms", ".4g")
        if any(r.get("peak_memory_gib") is not None for r in rows):
            lines += ["", "Peak memory, GiB:", ""] + _table(rows, methods, "peak_memory_gib", ".3g")
        if any(r.get("peak_rss_gib") is not None for r in rows):
            lines += ["", "Peak resident memory of the point's process, GiB:", ""]
            lines += _table(rows, methods, "peak_rss_gib", ".3g")
        if any(r.get("saved_gib") is not None for r in rows):
            lines += ["", "Saved for backward, GiB:", ""] + _table(rows, methods, "saved_gib", ".3g")
        skipped = [r for r in rows if r["status"] in ("skipped", "OOM", "error")]
        if skipped:
            lines += ["", "Not measured:", ""]
            lines += [f"* {r['method']}, N={r['seq_len']}: {r['status']}, {r['reason']}" for r in skipped]
        mass_methods = [m for m in methods if results["methods"][f"model/{m}"]["computes_masses"]]
        lines += ["", "Mean label mass S of the first step (equal across methods up to rounding):", ""]
        lines += _table(rows, mass_methods, "mean_label_mass", ".6g")
        lines.append("")
    plots = results.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def plot(results: dict, out_dir: Path, prefix: str) -> list:
    """PNG plots of time (and peak memory on CUDA) against N; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    groups = _kernel_groups(results["kernel"])
    for dtype, mode in dict.fromkeys((d, m) for d, _, m in groups):
        row_sets = [rs for d, rs, m in groups if d == dtype and m == mode]
        metrics = [("median_ms", "median time (ms)")]
        if any(r.get("peak_memory_gib") is not None for r in results["kernel"]):
            metrics.append(("peak_memory_gib", "peak memory (GiB)"))
        fig, axes = plt.subplots(len(metrics), len(row_sets), figsize=(5 * len(row_sets), 4 * len(metrics)),
                                 squeeze=False)
        for col, row_set in enumerate(row_sets):
            rows = groups[(dtype, row_set, mode)]
            for line, (key, label) in enumerate(metrics):
                _plot_lines(axes[line][col], rows, key, label, f"rows = {row_set}")
        fig.suptitle(f"label attention, {mode}, {dtype} ({results['environment']['device']})")
        names.append(_save(fig, out_dir, f"{prefix}_kernel_{dtype}_{mode.replace('+', '_')}.png"))
    models = dict.fromkeys(r["model"] for r in results["model"])
    for model in models:
        rows = [r for r in results["model"] if r["model"] == model]
        metrics = [("median_ms", "step time (ms)")]
        if any(r.get("peak_memory_gib") is not None for r in rows):
            metrics.append(("peak_memory_gib", "peak memory (GiB)"))
        if any(r.get("peak_rss_gib") is not None for r in rows):
            metrics.append(("peak_rss_gib", "peak resident memory (GiB)"))
        if any(r.get("saved_gib") is not None for r in rows):
            metrics.append(("saved_gib", "saved for backward (GiB)"))
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
        for col, (key, label) in enumerate(metrics):
            _plot_lines(axes[0][col], rows, key, label, model)
        fig.suptitle(f"ABFT step, {model} ({results['environment']['device']})")
        names.append(_save(fig, out_dir, f"{prefix}_model_{model}.png"))
    plt.close("all")
    return names


def _plot_lines(ax, rows: list, key: str, label: str, title: str) -> None:
    """One line per method; model-level rows with and without gradient checkpointing (different memory) are drawn as
    separate lines, the checkpointed one dashed."""
    settings = dict.fromkeys(r.get("gradient_checkpointing") for r in rows)
    for color, method in enumerate(_methods_run(rows)):
        for checkpointing in settings:
            points = sorted((r["seq_len"], r[key]) for r in rows
                            if r["method"] == method and r.get("gradient_checkpointing") == checkpointing
                            and r["status"] == "ok" and r.get(key) is not None)
            if points:
                name = f"{method}, checkpointed" if checkpointing and len(settings) > 1 else method
                ax.plot(*zip(*points), marker="s" if checkpointing else "o", linestyle="--" if checkpointing else "-",
                        color=f"C{color}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=100)
    return name


def summary(results: dict) -> str:
    """A short table for the terminal: median ms of every method that ran, at the largest N of each group."""
    lines = []
    groups = [(f"kernel {mode} {dtype} rows={row_set}", rows)
              for (dtype, row_set, mode), rows in _kernel_groups(results["kernel"]).items()]
    for model in dict.fromkeys(r["model"] for r in results["model"]):
        groups.append((f"model {model} step", [r for r in results["model"] if r["model"] == model]))
    for level in ("kernel", "model"):
        level_groups = [(name, rows) for name, rows in groups if name.startswith(level)]
        methods = _methods_run([r for _, rows in level_groups for r in rows])
        if not level_groups or not methods:
            continue
        width = max(len(name) for name, _ in level_groups) + 8
        lines.append(f"{level + ' (ms at the largest N)':{width}}" + "".join(f"{m:>12}" for m in methods))
        for name, rows in level_groups:
            largest = max(r["seq_len"] for r in rows)
            by_method = {r["method"]: r for r in rows if r["seq_len"] == largest}
            cells = [_cell(by_method[m], "median_ms", ".4g") if m in by_method else "" for m in methods]
            lines.append(f"{name + f' N={largest}':{width}}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def write_json(results: dict, out_dir: Path) -> Path:
    """results -> <mode>.json under out_dir, replaced in one step (a run killed while writing leaves the
    previous version whole)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results['mode']}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    os.replace(partial, path)
    return path


def write(results: dict, out_dir: Path, plots: bool = True) -> list:
    """results -> <mode>.json, <mode>_*.png (unless plots=False) and <mode>.md under out_dir; returns the
    paths written. The JSON is written first, so a failure while plotting loses no measurement."""
    results["plots"] = []
    json_path = write_json(results, out_dir)
    if plots:
        results["plots"] = plot(results, out_dir, results["mode"])
        write_json(results, out_dir)
    md_path = out_dir / f"{results['mode']}.md"
    md_path.write_text(markdown(results))
    return [json_path, md_path] + [out_dir / p for p in results["plots"]]
