"""Compiles every launch config of the Triton label-attention kernels for sm_80 and sm_90 without a GPU, and reports
registers per thread, spills and shared memory per config (issue 25, item 3).

    python scripts/triton_static_report.py [--out benchmarks/results/triton-static] [--quick]

Triton lowers each kernel to PTX for a GPUTarget and assembles it with its bundled ptxas; `ptxas -v` on that PTX
gives the registers and spill bytes, Triton's metadata the shared memory it allocates. A config passes when it
spills nothing and its shared memory fits the smallest GPU its table serves (triton_backend._GPU_CONFIGS: table 90
for compute capability 9.x/10.x, 227 KiB per block; table 80 for the others, 99 KiB). The compiled variant is the
one the benchmarks run: causal, head dims D = Dv = the bucket's width, 4 classes, both gradients in the backward.
--quick compiles one config per kernel for sm_90 and the feature variants the interpreter never compiles (sinks,
head dims that are not powers of two, Dv != D, a missing gradient, non-causal, fp32 and fp16), for the test suite;
a variant must compile, its spills are reported (with the table's configs some variants spill a few bytes).
Writes report.json and report.md to --out and exits 1 when a benchmark config fails (spills, shared memory) or
anything fails to compile. Run it with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abft_kernels.ops.label_attention import triton_backend as T  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
GPU_NAME = {80: "sm_80", 90: "sm_90a"}  # Triton targets sm_90a on Hopper (wgmma)
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024}  # bytes of shared memory per block of the table's smallest GPU
KERNELS = {"forward": T.label_attention_forward_kernel, "dkdv": T.label_attention_backward_dkdv_kernel,
           "dq": T.label_attention_backward_dq_kernel}
DTYPES = {"half": ("bf16", "fp16"), "fp32": ("fp32",)}
POINTERS = dict(KeyCode="*i32", BlockFlags="*i32", RowSlot="*i32", SinksLog2="*fp32", LseLog2="*fp32",
                Mass="*fp32", Delta="*fp32", GradMass="*fp32")
TENSORS = ("Q", "K", "V", "Out", "GradOut", "GradQ", "GradK", "GradV")


def constexprs(kind: str, dtype: str, head_dim: int, value_dim: int, config: tuple, **variant) -> dict:
    """The compile-time arguments of one launch, as triton_backend's launchers pass them."""
    block_m, block_n, _, _ = config
    blocks = T._block_sizes(head_dim, value_dim, num_classes=4)
    values = dict(CAUSAL=variant.get("causal", True), DOT_FP32=dtype == "fp32", **blocks, BLOCK_M=block_m,
                  BLOCK_N=block_n)
    if kind == "forward":
        values.update(HAS_SINKS=variant.get("sinks", False), MASS_SPLIT=dtype != "fp32")
        if not values["HAS_SINKS"]:
            values["SinksLog2"] = None
    else:
        del values["BLOCK_C"]  # the backward gathers the mass gradient class by class
        values.update(HAS_OUT_GRAD=variant.get("out_grad", True), HAS_MASS_GRAD=variant.get("mass_grad", True))
        if not values["HAS_OUT_GRAD"]:
            values.update(GradOut=None, GradV=None)
        if not values["HAS_MASS_GRAD"]:
            values["GradMass"] = None
    return values


def compile_config(kind: str, arch: int, dtype: str, head_dim: int, value_dim: int, config: tuple,
                   **variant) -> dict:
    """Compiles one kernel for one target; its resources by ptxas -v and Triton's metadata."""
    fn = KERNELS[kind]
    values = constexprs(kind, dtype, head_dim, value_dim, config, **variant)
    signature = {name: "constexpr" if name in values else
                 POINTERS.get(name, f"*{dtype}" if name in TENSORS else "fp32" if "scale" in name else "i32")
                 for name in fn.arg_names}
    start = time.monotonic()
    compiled = triton.compile(ASTSource(fn, signature, constexprs=values), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config[2], num_stages=config[3]))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([str(PTXAS), "-v", "--gpu-name", GPU_NAME[arch], str(ptx), "-o", str(ptx) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores, spill_loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                           log).groups())
    shared = compiled.metadata.shared
    ok = spill_stores == 0 and spill_loads == 0 and shared <= SHARED_LIMIT[arch]
    return {"kernel": kind, "table": arch, "target": GPU_NAME[arch], "dtype": dtype, "head_dim": head_dim,
            "value_dim": value_dim, "variant": variant or "benchmark", "BLOCK_M": config[0], "BLOCK_N": config[1],
            "num_warps": config[2], "num_stages": config[3], "registers_per_thread": registers,
            "spill_stores_bytes": spill_stores, "spill_loads_bytes": spill_loads, "shared_bytes": shared,
            "shared_limit_bytes": SHARED_LIMIT[arch], "ok": ok, "compile_s": round(time.monotonic() - start, 1)}


def full_plan() -> list:
    """Every entry of the config tables, for each dtype of its precision."""
    plan = []
    for kind, tables in T._GPU_CONFIGS.items():
        for arch, table in tables.items():
            for (bucket, precision), config in table.items():
                for dtype in DTYPES[precision]:
                    plan.append((kind, arch, dtype, bucket, bucket, config, {}))
    return plan


def quick_plan() -> list:
    """One benchmark config per kernel on sm_90, then the feature variants on small configs."""
    plan = [(kind, 90, "bf16", 128, 128, T._GPU_CONFIGS[kind][90][128, "half"], {}) for kind in KERNELS]
    plan += [("forward", 90, "fp16", 80, 96, T._GPU_CONFIGS["forward"][90][128, "half"], {"sinks": True}),
             ("forward", 90, "fp32", 64, 64, T._GPU_CONFIGS["forward"][90][64, "fp32"], {"causal": False}),
             ("dkdv", 90, "fp16", 64, 128, T._GPU_CONFIGS["dkdv"][90][128, "half"], {"out_grad": False}),
             ("dq", 90, "fp16", 64, 64, T._GPU_CONFIGS["dq"][90][64, "half"], {"mass_grad": False}),
             ("dq", 80, "fp32", 24, 16, T._GPU_CONFIGS["dq"][80][64, "fp32"], {"causal": False})]
    return plan


def markdown(rows: list) -> str:
    lines = ["# Triton label-attention kernels compiled statically (scripts/triton_static_report.py)", "",
             f"Triton {triton.__version__}, its bundled ptxas; no GPU involved. A row passes with 0 spill bytes and "
             "shared memory within the limit of its table's smallest GPU. Registers are per thread.", "",
             "| kernel | target | dtype | D/Dv | variant | BLOCK_M | BLOCK_N | warps | stages | registers | spill "
             "stores/loads B | shared B (limit) | ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        variant = r["variant"] if isinstance(r["variant"], str) else ", ".join(f"{k}={v}" for k, v in
                                                                             r["variant"].items())
        lines.append(f"| {r['kernel']} | {r['target']} | {r['dtype']} | {r['head_dim']}/{r['value_dim']} | {variant} "
                     f"| {r['BLOCK_M']} | {r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['registers_per_thread']} | {r['spill_stores_bytes']}/{r['spill_loads_bytes']} | "
                     f"{r['shared_bytes']} ({r['shared_limit_bytes']}) | {'yes' if r['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/triton-static"))
    parser.add_argument("--quick", action="store_true", help="one config per kernel and the feature variants")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: the interpreter compiles nothing")
    rows = []
    for kind, arch, dtype, head_dim, value_dim, config, variant in (quick_plan() if args.quick else full_plan()):
        rows.append(compile_config(kind, arch, dtype, head_dim, value_dim, config, **variant))
        r = rows[-1]
        print(f"{kind:8} {r['target']:7} {dtype:5} D{head_dim}/{value_dim} {config}: {r['registers_per_thread']} regs, "
              f"spills {r['spill_stores_bytes']}/{r['spill_loads_bytes']} B, shared {r['shared_bytes']} B"
              f"{'' if r['ok'] else '  FAILS'} ({r['compile_s']} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"triton": triton.__version__, "command": "python scripts/triton_static_report.py"
            + (" --quick" if args.quick else "")}
    (args.out / "report.json").write_text(json.dumps({**meta, "configs": rows}, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(rows))
    failed = [r for r in rows if not r["ok"] and r["variant"] == "benchmark"]
    spilling_variants = [r for r in rows if not r["ok"] and r["variant"] != "benchmark"]
    print(f"{len(rows) - len(failed) - len(spilling_variants)} of {len(rows)} configs pass; "
          f"{len(spilling_variants)} feature variants compile but spill or overflow; written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
