"""Kernel level: one measurement of one method on one shape, forward or forward + backward."""
from __future__ import annotations

from typing import Optional

import torch

import abft_kernels as ak

from .methods import Method
from .shapes import KernelProblem, KernelShape, make_problem
from .timing import Timing, guarded, kernel_median_ms, peak_memory_gib, too_big


def reference_mass(shape: KernelShape, device: torch.device) -> torch.Tensor:
    """Exact fp32 masses of the shape's problem (inputs rounded to its dtype first), row by row."""
    p = make_problem(shape, device)
    _, mass = ak.label_attention(p.q.float(), p.k.float(), p.v.float(), p.key_class, p.num_classes,
                                 query_rows=p.row_positions, backend="torch")
    return mass


def relative_error(x: torch.Tensor, ref: torch.Tensor):
    """||x - ref|| / ||ref|| in float64, or "non-finite" when x has NaN or inf."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return "non-finite"
    return ((x - ref).norm() / ref.norm()).item()


def kernel_row(method: Method, shape: KernelShape, backward: bool) -> dict:
    """What identifies a kernel-level result row: level, method, mode and the shape."""
    return {"level": "kernel", "method": method.name, "mode": "fwd+bwd" if backward else "fwd", **shape.describe()}


def measure_kernel(method: Method, shape: KernelShape, device: torch.device, backward: bool, timing: Timing,
                   ref_mass: Optional[torch.Tensor] = None) -> dict:
    """A result row: shape, method, mode, status ("ok", "OOM", "skipped", "unavailable", "error") and,
    when ok, median_ms, tflops, peak_memory_gib (None off CUDA) and mass_rel_err (forward only)."""
    row = kernel_row(method, shape, backward)
    reason = method.unavailable(device, backward)
    if reason is not None:
        return {**row, "status": "unavailable", "reason": reason}
    estimate = method.memory_estimate(shape, backward) if method.memory_estimate else None
    reason = too_big(estimate, device)
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason}
    return {**row, **guarded(lambda: _measure(method, shape, device, backward, timing, ref_mass), device)}


def make_step(method: Method, problem: KernelProblem, backward: bool):
    """(the timed callable, the outputs of a first forward call): forward, or forward then the gradients of
    q, k, v for fixed random output gradients. The first call compiles where the method compiles."""
    forward = method.build(problem)
    outputs = [t for t in forward() if t is not None]
    if not backward:
        return forward, outputs
    leaves = (problem.q, problem.k, problem.v)
    grads = [torch.randn_like(t) for t in outputs]

    def step():
        results = [t for t in forward() if t is not None]
        torch.autograd.grad(results, leaves, grads, allow_unused=True)

    return step, outputs


def _measure(method: Method, shape: KernelShape, device: torch.device, backward: bool, timing: Timing,
             ref_mass: Optional[torch.Tensor]) -> dict:
    problem = make_problem(shape, device, requires_grad=backward)
    result = {}
    if method.backend is not None:  # which backend our call runs on, and why (auto's choice)
        choice = ak.resolve_backend(problem.q, problem.k, problem.v, problem.key_class, problem.num_classes,
                                    query_rows=problem.query_rows, backend=method.backend)
        result.update(backend=choice.name, backend_reason=choice.reason)
    step, outputs = make_step(method, problem, backward)
    if not backward and method.computes_masses and ref_mass is not None:
        result["mass_rel_err"] = relative_error(outputs[1], ref_mass)
    del outputs
    median_ms = kernel_median_ms(step, device, timing)
    result["median_ms"] = median_ms
    result["tflops"] = shape.attention_flops(backward) / (median_ms * 1e-3) / 1e12
    result["peak_memory_gib"] = peak_memory_gib(step, device)
    return result
