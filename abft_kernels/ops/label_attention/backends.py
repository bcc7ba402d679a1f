"""The backends of label_attention, what each can take, and how backend="auto" chooses.

Every backend is a module of this package with a ``NAME`` (the string users pass as ``backend=``), an
``unsupported(args) -> Optional[str]`` (None when the backend computes these validated arguments exactly, else the
reason it cannot: device, dtype, head dims, number of classes, ...) and one function ``(args) -> (out, mass)``
named for what it does (``BACKEND_FUNCTIONS``):

* reference_backend.reference_label_attention: float64, materialises the N x N probabilities (the oracle);
* torch_backend.sdpa_with_row_mass: SDPA's output plus an exact recompute of the mass rows (row_mass_torch);
* triton_backend.fused_label_attention: the fused flash-attention kernel that also accumulates the masses;
* cuda_backend.sdpa_with_cuda_row_mass: SDPA's output plus the compiled row-mass kernels of csrc/.

A backend is *available* when its module imports: the module of an optional backend raises ImportError with
the reason (Triton not installed, the CUDA extension not built) when it cannot run here.

``auto`` tries the backends of ``AUTO_ORDER`` for the inputs' device and the number of rows that carry a mass, in
that order, and takes the first that is available and supports the arguments. The order on CUDA is measured
(benchmarks/results/nvidia-h200/gpu-headline.md: one H200, bf16, Hq = 32, Hkv = 8, D = 128, causal, C = 4):

* few rows (R <= N / 8; ABFT's one query row per prompt): "torch", i.e. SDPA's output plus an exact recompute of
  the R rows. At R = 1, forward + backward: 1.31x SDPA alone at N = 8192 and 1.09x at 32768, against 3.4x and
  3.2x for the fused Triton kernel (whose flash part runs at about 0.2x SDPA's TFLOP/s). The compiled "cuda"
  row-mass extension was faster only at N = 2048 (1.81x against torch's 2.28x) and is never chosen automatically.
* many rows (R > N / 8; query_rows=None is R = N): "triton", the fused kernel. At R = N, forward: 2.9 / 9.7 /
  72 ms at N = 2048 / 8192 / 32768, 6x to 7x faster than "cuda" and 2.8x faster than "torch" (27 / 202 ms at
  8192 / 32768).
* only R = 1 and R = N were measured; the boundary N / 8 is where the row recompute's extra work (4·R·N·Hq·D
  fp32 FLOPs forward, about twice that backward) reaches the fused kernel's measured overhead over SDPA.

Every other device runs "torch". ``reference`` (float64, O(N²) memory) is for tests.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple

from .validation import LabelAttentionArgs

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
BACKEND_FUNCTIONS = {"reference": "reference_label_attention", "torch": "sdpa_with_row_mass",
                     "triton": "fused_label_attention", "cuda": "sdpa_with_cuda_row_mass"}
_MODULES = {
    "reference": f"{__package__}.reference_backend",
    "torch": f"{__package__}.torch_backend",
    "triton": f"{__package__}.triton_backend",
    "cuda": f"{__package__}.cuda_backend",
}
# backend="auto": candidates per device type and row regime, first choice first (see the module's docstring);
# every other device type gets _AUTO_FALLBACK.
AUTO_ORDER = {"cuda": {"few rows": ("torch", "triton"), "many rows": ("triton", "torch")}}
_AUTO_FALLBACK = {"few rows": ("torch",), "many rows": ("torch",)}
FEW_ROWS_PER_KEY = 1 / 8  # R <= N / 8 is "few rows"


class BackendChoice(NamedTuple):
    """The backend that runs a call, and why it was chosen (for logs and benchmark reports)."""

    name: str
    reason: str


@lru_cache(maxsize=None)
def _load(name: str):
    """(module, None) when backend `name` imports here, else (None, why not)."""
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as exc:
        return None, str(exc)


def backend_available(name: str) -> bool:
    """Whether backend `name` can run here at all (it may still refuse some arguments, e.g. CPU tensors)."""
    check_backend_name(name)
    return name == "auto" or _load(name)[0] is not None


def backend_status(name: str) -> str:
    """One line: "available", or why backend `name` cannot run here."""
    check_backend_name(name)
    if name == "auto":
        return "available"
    return _load(name)[1] or "available"


def clear_backend_cache() -> None:
    """Forget which backends imported (tests that swap the CUDA extension for a stand-in call this)."""
    _load.cache_clear()


def check_backend_name(name) -> None:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def _why_not(name: str, args: LabelAttentionArgs) -> Tuple[Optional[object], Optional[str]]:
    module, reason = _load(name)
    if module is None:
        return None, f"not available here: {reason}"
    reason = module.unsupported(args)
    return (None, reason) if reason else (module, None)


def choose_backend(backend: str, args: LabelAttentionArgs):
    """(module, BackendChoice) for `backend` on these arguments.

    Raises:
        ValueError: an unknown name; an explicit backend that is unavailable or cannot take the arguments (with its
            own reason); "auto" when no candidate can (with every candidate's reason).
    """
    check_backend_name(backend)
    if backend != "auto":
        module, reason = _why_not(backend, args)
        if module is None:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
        return module, BackendChoice(backend, "requested")
    seq_len = args.q.shape[2]
    num_rows = seq_len if args.query_rows is None else args.query_rows.shape[1]
    regime = "few rows" if num_rows <= FEW_ROWS_PER_KEY * seq_len else "many rows"
    order = AUTO_ORDER.get(args.q.device.type, _AUTO_FALLBACK)[regime]
    skipped = []
    for name in order:
        module, reason = _why_not(name, args)
        if module is not None:
            why = f"auto on {args.q.device.type}, {regime} (R={num_rows}, N={seq_len}): first of {order} that takes " \
                  "the call"
            return module, BackendChoice(name, why + "".join(f"; skipped {s}" for s in skipped))
        skipped.append(f"{name} ({reason})")
    raise ValueError(f"backend='auto' found no backend for this call: {'; '.join(skipped)}")
