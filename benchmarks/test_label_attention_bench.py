"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only`.

Every compared method on a few shapes, forward and forward + backward, on CUDA when there is one (else
tiny CPU shapes). Methods that cannot run here are skipped with their reason. For sweeps, JSON, tables
and plots use `python -m benchmarks.run`.
"""
import pytest
import torch

from benchmarks.kernel_level import make_step
from benchmarks.methods import METHODS
from benchmarks.shapes import KernelShape, make_problem
from benchmarks.timing import synchronize, too_big

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    SHAPES = [KernelShape(1, 32, 8, 128, seq_len, rows, "bfloat16") for seq_len in (4096, 16384)
              for rows in ("last", "all")]
else:
    SHAPES = [KernelShape(1, 4, 2, 32, 256, rows, "bfloat16", demo_len=32) for rows in ("last", "all")]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s.seq_len}-rows_{s.rows}-{s.dtype}")
@pytest.mark.parametrize("name", list(METHODS))
def test_label_attention(benchmark, name, shape, backward):
    method = METHODS[name]
    reason = method.unavailable(DEVICE, backward)
    if reason is None and method.memory_estimate is not None:
        reason = too_big(method.memory_estimate(shape, backward), DEVICE)
    if reason is not None:
        pytest.skip(reason)
    step, _ = make_step(method, make_problem(shape, DEVICE, requires_grad=backward), backward)

    def synchronized_step():
        step()
        synchronize(DEVICE)

    benchmark.group = f"N={shape.seq_len} rows={shape.rows} {'fwd+bwd' if backward else 'fwd'}"
    benchmark.extra_info.update(shape.describe(), tflop=shape.attention_flops(backward) / 1e12)
    benchmark.pedantic(synchronized_step, warmup_rounds=1, rounds=10)
