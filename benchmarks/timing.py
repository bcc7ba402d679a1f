"""Timing, peak memory and out-of-memory handling, on CUDA or CPU."""
from __future__ import annotations

import gc
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Exit status of `python -m benchmarks.run` when a call broke the CUDA context and the run stopped early:
# rerun it with --resume (the broken method is not run again) to measure the rest.
EXIT_CONTEXT_BROKEN = 3


@dataclass(frozen=True)
class Timing:
    """How long to measure. GPU kernels go through triton.testing.do_bench (times in ms); everything
    else is the median wall time of `reps` calls after `warmup` calls."""

    warmup: int = 2
    reps: int = 10
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn in ms after `warmup` untimed calls (the device is synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernel_median_ms(fn: Callable[[], object], device: torch.device, timing: Timing) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench  # CUDA events, L2 flushed between calls, warm-up excluded

        return float(do_bench(fn, warmup=timing.gpu_warmup_ms, rep=timing.gpu_rep_ms, return_mode="median"))
    return wall_median_ms(fn, device, timing.warmup, timing.reps)


def peak_memory_gib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """torch.cuda.max_memory_allocated during one call of fn, in GiB (what was allocated before, such as
    inputs and weights, included); None off CUDA, where it is not measured."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def saved_bytes(fn: Callable[[], object]):
    """(bytes, fn()): the bytes of the distinct storages autograd saves for backward while fn runs (a
    saved_tensors_hooks pack hook sees every saved tensor; views of one storage count once)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def too_big(needed_bytes: Optional[float], device: torch.device, limit: Optional[float] = None) -> Optional[str]:
    """A 'skipped: ...' reason when an estimate says a run cannot fit in the device's memory (90% of it), or in
    `limit` bytes when given."""
    if needed_bytes is None:
        return None
    if limit is not None:
        if needed_bytes <= limit:
            return None
        return f"estimate {needed_bytes / 2 ** 30:.1f} GiB > the {limit / 2 ** 30:.0f} GiB limit"
    have = device_memory_bytes(device)
    if needed_bytes <= 0.9 * have:
        return None
    return f"needs ~{needed_bytes / 2 ** 30:.0f} GiB, the device has {have / 2 ** 30:.0f} GiB"


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def error_summary(error: BaseException) -> str:
    """The error's type and the first line of its message (compiler errors run to pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def guarded(measure: Callable[[], dict], device: torch.device) -> dict:
    """Run a measurement; an out-of-memory error becomes status "OOM", any other error status "error"."""
    try:
        result = {"status": "ok", **measure()}
    except Exception as error:  # the runner reports every failure and goes on to the next measurement
        result = {"status": "OOM" if is_out_of_memory(error) else "error", "reason": error_summary(error)}
    if result["status"] != "ok":
        gc.collect()  # the error's traceback held the failed run's tensors in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def cuda_context_error(device: torch.device) -> Optional[str]:
    """Why the CUDA context can no longer run work (an illegal memory access and the like are sticky: every
    later call fails too), or None when it still can. None off CUDA."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as error:  # whatever the failure, the process cannot measure on this device any more
        return error_summary(error)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def device_slug(device: torch.device) -> str:
    """The results folder name: the device name in lower case, words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
