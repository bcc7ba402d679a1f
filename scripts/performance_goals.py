"""Scores measured benchmark results against the project's performance goals (docs/benchmarks.md): the GPU
headline goals and the long-context goals on CPU, read off the results of `python -m benchmarks.run` (its JSON as
a dict). Used by scripts/gpu_session.py; run on its own, it prints the long-context goals of result files.

Each goal comes back met, missed or not measured, with the numbers it was decided on, per sequence length.
The GPU headline goals (evaluate; the preset gpu-headline measures them):
  1. R = 1 (ABFT's query row), forward + backward: the fastest of our backends (torch, triton, cuda) within
     10% of SDPA alone (which computes no masses);
  2. R = N, forward: triton at least 0.7x SDPA's TFLOP/s, and
  3. faster than SDPA with the one-hot labels appended to V;
  4. model step: abft's peak memory within 10% of plain SDPA training (no masses);
  5. at N = 4096, abft's peak memory at least 10x below eager attention's (output_attentions);
  6. at N = 32768, abft runs where eager attention cannot.
The long-context goals, the model step on CPU, each --isolate point in its own process (long_context_goals):
  7. abft's peak resident memory within 10% of plain SDPA training's at every N;
  8. abft's step time within 15% of plain SDPA training's at N >= 2048.
Rows are paired on (model, N, gradient checkpointing).

    python scripts/performance_goals.py RESULTS.json [RESULTS.json ...]

prints the long-context goals over the model rows of several runs (a row of a later file replaces the same point of
an earlier one). A goal is "met" when it holds at every N measured and every N was measured, "met where measured"
when some N lack a number, "missed" when it fails at some N, "not measured" when no N has the numbers.
"""
from __future__ import annotations

from typing import Optional

OURS = ("torch", "triton", "cuda")


def _find(table: list, method: str, **fields) -> Optional[dict]:
    for row in table:
        if row["method"] == method and all(row.get(k) == v for k, v in fields.items()):
            return row
    return None


def _why_not(row: Optional[dict], method: str) -> str:
    if row is None:
        return f"{method} not in the run"
    return f"{method} {row['status']}" + (f" ({row['reason'][:120]})" if row.get("reason") else "")


def _ok(row: Optional[dict]) -> bool:
    return row is not None and row["status"] == "ok"


def _cannot_run(row: Optional[dict]) -> bool:
    """Out of memory, or too big by its size estimate (not: left out for lack of time)."""
    return row is not None and row["status"] in ("OOM", "skipped") and "time budget" not in row.get("reason", "")


def _peaks_missing(pairs) -> Optional[str]:
    """Why the peak memories of (row, method) pairs cannot be compared, or None."""
    why = [_why_not(row, method) for row, method in pairs if not _ok(row)]
    if not why and any(row.get("peak_memory_gib") is None for row, _ in pairs):
        why = ["peak memory not measured"]
    return "; ".join(why) or None


def _verdict(goal: str, checks: list) -> dict:
    """checks: (N, True / False / None = not measured, text) -> the goal's status and details."""
    results = [ok for _, ok, _ in checks]
    if False in results:
        status = "missed"
    elif True not in results:
        status = "not measured"
    else:
        status = "met" if None not in results else "met where measured"
    return {"goal": goal, "status": status, "details": [f"N={n}: {text}" for n, _, text in checks]}


def _seq_lens(table: list, **fields) -> list:
    return sorted({r["seq_len"] for r in table if all(r.get(k) == v for k, v in fields.items())})


def r1_forward_backward(kernel: list) -> dict:
    checks = []
    for n in _seq_lens(kernel, rows="last", mode="fwd+bwd"):
        sdpa = _find(kernel, "sdpa", rows="last", mode="fwd+bwd", seq_len=n)
        ours = [r for r in (_find(kernel, m, rows="last", mode="fwd+bwd", seq_len=n) for m in OURS) if _ok(r)]
        if not _ok(sdpa) or not ours:
            why = [_why_not(sdpa, "sdpa")] if not _ok(sdpa) else []
            why += [] if ours else [_why_not(_find(kernel, m, rows="last", mode="fwd+bwd", seq_len=n), m) for m in OURS]
            checks.append((n, None, "; ".join(why)))
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        ratio = best["median_ms"] / sdpa["median_ms"]
        checks.append((n, ratio <= 1.10, f"best {best['method']} {best['median_ms']:.3g} ms vs sdpa "
                                         f"{sdpa['median_ms']:.3g} ms = {ratio:.2f}x (goal <= 1.10x)"))
    return _verdict("R=1 fwd+bwd: best of torch/triton/cuda within 10% of sdpa", checks)


def rn_triton_tflops(kernel: list) -> dict:
    checks = []
    for n in _seq_lens(kernel, rows="all", mode="fwd"):
        sdpa, triton = (_find(kernel, m, rows="all", mode="fwd", seq_len=n) for m in ("sdpa", "triton"))
        if not (_ok(sdpa) and _ok(triton)):
            checks.append((n, None, "; ".join(_why_not(r, m) for r, m in ((sdpa, "sdpa"), (triton, "triton"))
                                              if not _ok(r))))
            continue
        ratio = triton["tflops"] / sdpa["tflops"]
        checks.append((n, ratio >= 0.7, f"triton {triton['tflops']:.3g} vs sdpa {sdpa['tflops']:.3g} TFLOP/s = "
                                        f"{ratio:.2f}x (goal >= 0.70x)"))
    return _verdict("R=N fwd: triton >= 0.7x sdpa TFLOP/s", checks)


def rn_triton_vs_onehot(kernel: list) -> dict:
    checks = []
    for n in _seq_lens(kernel, rows="all", mode="fwd"):
        triton, onehot = (_find(kernel, m, rows="all", mode="fwd", seq_len=n) for m in ("triton", "sdpa_onehot"))
        if not _ok(triton):
            checks.append((n, None, _why_not(triton, "triton")))
        elif _cannot_run(onehot):
            checks.append((n, True, f"triton {triton['median_ms']:.3g} ms; sdpa_onehot cannot run "
                                    f"({onehot['status']}: {onehot.get('reason', '')[:80]})"))
        elif not _ok(onehot):
            checks.append((n, None, _why_not(onehot, "sdpa_onehot")))
        else:
            checks.append((n, triton["median_ms"] < onehot["median_ms"],
                           f"triton {triton['median_ms']:.3g} ms vs sdpa_onehot {onehot['median_ms']:.3g} ms"))
    return _verdict("R=N fwd: triton faster than sdpa_onehot", checks)


def _model_rows(model: list) -> tuple:
    """The rows of one model (llama-3-8b when present, else the first one run) and its label."""
    names = list(dict.fromkeys(r["model"] for r in model))
    if not names:
        return [], "no model rows"
    name = "llama-3-8b" if "llama-3-8b" in names else names[0]
    rows = [r for r in model if r["model"] == name]
    layers, full = rows[0].get("num_layers"), rows[0].get("model_num_layers")
    return rows, name + (f", first {layers} of {full} layers" if layers != full else "")


def _peak(row: dict) -> str:
    return f"{row['peak_memory_gib']:.3g} GiB" if row.get("peak_memory_gib") is not None else "n/a"


def model_peak_vs_sdpa(model: list) -> dict:
    rows, label = _model_rows(model)
    checks = []
    for n in _seq_lens(rows):
        abft, sdpa = _find(rows, "abft", seq_len=n), _find(rows, "sdpa", seq_len=n)
        missing = _peaks_missing([(abft, "abft"), (sdpa, "sdpa")])
        if missing:
            checks.append((n, None, missing))
            continue
        ratio = abft["peak_memory_gib"] / sdpa["peak_memory_gib"]
        checks.append((n, ratio <= 1.10, f"abft {_peak(abft)} vs sdpa {_peak(sdpa)} = {ratio:.2f}x (goal <= 1.10x)"))
    return _verdict(f"model step ({label}): abft peak memory within 10% of plain SDPA training", checks)


def model_vs_eager_4096(model: list, seq_len: int = 4096) -> dict:
    rows, label = _model_rows(model)
    abft, eager = _find(rows, "abft", seq_len=seq_len), _find(rows, "eager", seq_len=seq_len)
    missing = _peaks_missing([(abft, "abft"), (eager, "eager")])
    if missing:
        check = (seq_len, None, missing)
    else:
        ratio = eager["peak_memory_gib"] / abft["peak_memory_gib"]
        text = f"eager {_peak(eager)} vs abft {_peak(abft)} = {ratio:.1f}x (goal >= 10x)"
        weights = abft.get("weights_gib")
        if weights is not None:  # the weights are in both peaks; what each adds on top of them is the attention's cost
            text += (f"; above the {weights:.3g} GiB of weights: eager {eager['peak_memory_gib'] - weights:.3g} GiB, "
                     f"abft {abft['peak_memory_gib'] - weights:.3g} GiB")
        check = (seq_len, ratio >= 10, text)
    return _verdict(f"model step ({label}) at N={seq_len}: abft peak memory >= 10x below eager", [check])


def model_runs_where_eager_cannot(model: list, seq_len: int = 32768) -> dict:
    rows, label = _model_rows(model)
    abft, eager = _find(rows, "abft", seq_len=seq_len), _find(rows, "eager", seq_len=seq_len)
    if not _ok(abft):
        check = (seq_len, False if abft is not None and abft["status"] in ("OOM", "error") else None,
                 _why_not(abft, "abft"))
    elif _ok(eager):
        check = (seq_len, False, f"eager runs too ({_peak(eager)}), abft {_peak(abft)}")
    elif _cannot_run(eager):
        check = (seq_len, True, f"abft {abft['median_ms']:.4g} ms, {_peak(abft)}; eager {eager['status']}: "
                                f"{eager.get('reason', '')[:100]}")
    else:
        check = (seq_len, None, f"abft ok ({_peak(abft)}); " + _why_not(eager, "eager"))
    return _verdict(f"model step ({label}) at N={seq_len}: abft runs where eager cannot", [check])


def evaluate(results: dict) -> list:
    """The GPU headline goals (1 to 6 above), in that order, each {"goal", "status", "details"}."""
    kernel, model = results.get("kernel", []), results.get("model", [])
    return [r1_forward_backward(kernel), rn_triton_tflops(kernel), rn_triton_vs_onehot(kernel),
            model_peak_vs_sdpa(model), model_vs_eager_4096(model), model_runs_where_eager_cannot(model)]


def _pairs(model: list):
    """(N, checkpointing, abft row, sdpa row) of every point of the model rows (see _model_rows) that has either."""
    rows, label = _model_rows(model)
    points = sorted({(r["seq_len"], bool(r.get("gradient_checkpointing"))) for r in rows})
    return label, [(n, ckpt, _find(rows, "abft", seq_len=n, gradient_checkpointing=ckpt),
                    _find(rows, "sdpa", seq_len=n, gradient_checkpointing=ckpt)) for n, ckpt in points]


def _pair_missing(abft: Optional[dict], sdpa: Optional[dict]) -> Optional[str]:
    """Why the abft and sdpa rows of one point cannot be compared, or None."""
    return "; ".join(_why_not(r, m) for r, m in ((abft, "abft"), (sdpa, "sdpa")) if not _ok(r)) or None


def _point(n: int, checkpointing: bool) -> str:
    return f"{n}, checkpointed" if checkpointing else str(n)


def model_rss_vs_sdpa(model: list) -> dict:
    label, pairs = _pairs(model)
    checks = []
    for n, ckpt, abft, sdpa in pairs:
        missing = _pair_missing(abft, sdpa)
        if not missing and (abft.get("peak_rss_gib") is None or sdpa.get("peak_rss_gib") is None):
            missing = "peak RSS not measured (--isolate)"
        if missing:
            checks.append((_point(n, ckpt), None, missing))
            continue
        ratio = abft["peak_rss_gib"] / sdpa["peak_rss_gib"]
        checks.append((_point(n, ckpt), ratio <= 1.10, f"abft {abft['peak_rss_gib']:.3g} GiB vs sdpa "
                                                       f"{sdpa['peak_rss_gib']:.3g} GiB = {ratio:.3f}x (goal <= 1.10x)"))
    return _verdict(f"model step ({label}): abft peak resident memory within 10% of plain SDPA training", checks)


def model_time_vs_sdpa(model: list, min_seq_len: int = 2048) -> dict:
    label, pairs = _pairs(model)
    checks = []
    for n, ckpt, abft, sdpa in pairs:
        if n < min_seq_len:
            continue
        missing = _pair_missing(abft, sdpa)
        if missing:
            checks.append((_point(n, ckpt), None, missing))
            continue
        ratio = abft["median_ms"] / sdpa["median_ms"]
        loads = ", ".join(f"{r.get('load_average_1min')}" for r in (abft, sdpa))
        checks.append((_point(n, ckpt), ratio <= 1.15, f"abft {abft['median_ms'] / 1e3:.4g} s vs sdpa "
                                                       f"{sdpa['median_ms'] / 1e3:.4g} s = {ratio:.3f}x (goal <= 1.15x; "
                                                       f"load average after the steps {loads})"))
    return _verdict(f"model step ({label}): abft time within 15% of plain SDPA training at N >= {min_seq_len}",
                    checks)


def long_context_goals(results: dict) -> list:
    """The long-context goals (7 and 8 above), each {"goal", "status", "details"}."""
    model = results.get("model", [])
    return [model_rss_vs_sdpa(model), model_time_vs_sdpa(model)]


def merged_model_rows(paths) -> list:
    """The model rows of several result files; a later file's row replaces the same point of an earlier file."""
    import json
    from pathlib import Path

    from benchmarks.run import ROW_KEYS

    rows = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()).get("model", []):
            # num_layers None: every layer (older files give no model_num_layers); checkpointing None: off.
            every_layer = r.get("num_layers") in (None, r.get("model_num_layers"))
            point = {**r, "num_layers": None if every_layer else r["num_layers"],
                     "gradient_checkpointing": bool(r.get("gradient_checkpointing"))}
            rows[tuple(point.get(k) for k in ROW_KEYS["model"])] = r
    return list(rows.values())


def markdown(goals: list) -> str:
    lines = ["| goal | status | numbers |", "|---|---|---|"]
    for g in goals:
        lines.append(f"| {g['goal']} | **{g['status']}** | {'<br>'.join(g['details']) or 'no rows'} |")
    return "\n".join(lines)


def text(goals: list) -> str:
    """The goals as terminal lines: status, goal, then its numbers indented."""
    lines = []
    for g in goals:
        lines.append(f"{g['status'].upper():<20} {g['goal']}")
        lines += [f"{'':<20}   {d}" for d in g["details"]]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/performance_goals.py RESULTS.json [RESULTS.json ...]")
    print(markdown(long_context_goals({"model": merged_model_rows(sys.argv[1:])})))
