"""Every documented bad input to label_attention raises ValueError naming the argument."""
import pytest
import torch

import abft_kernels as ak
from helpers import make_problem


def good():
    return make_problem(batch=2, heads=4, kv_heads=2, seq_len=8, head_dim=4, num_classes=3, rows="last")


BAD_INPUTS = [
    (dict(q=torch.randn(4, 8, 4)), "q must have shape"),
    (dict(k=torch.randn(2, 3, 8, 4), v=torch.randn(2, 3, 8, 4)), "divide"),
    (dict(v=torch.randn(2, 2, 7, 4)), "k and v"),
    (dict(k=torch.randn(2, 2, 8, 5), v=torch.randn(2, 2, 8, 5)), "k must have shape"),
    (dict(k=torch.randn(2, 2, 8, 4, dtype=torch.float64), v=torch.randn(2, 2, 8, 4, dtype=torch.float64)), "dtype"),
    (dict(q=torch.randint(0, 3, (2, 4, 8, 4))), "q must be float"),
    (dict(key_class=torch.zeros(2, 7, dtype=torch.long)), "key_class must have shape"),
    (dict(key_class=torch.zeros(2, 8)), "key_class must be an integer"),
    (dict(key_class=torch.full((2, 8), 3)), "key_class values"),
    (dict(key_class=torch.full((2, 8), -2)), "key_class values"),
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=2.0), "num_classes"),
    (dict(query_rows=torch.tensor([[8], [0]])), "query_rows values"),
    (dict(query_rows=torch.tensor([[-2], [0]])), "query_rows values"),
    (dict(query_rows=torch.tensor([[1]])), "query_rows must have shape"),
    (dict(query_rows=torch.tensor([[1.0], [2.0]])), "query_rows must be an integer"),
    (dict(key_padding_mask=torch.ones(2, 8)), "key_padding_mask must be a bool"),
    (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), "key_padding_mask must have shape"),
    (dict(scale=-1.0), "scale"),
    (dict(backend="flash"), "backend"),
    (dict(key_class=torch.zeros(2, 8, dtype=torch.long, device="meta")), "device"),
    (dict(v=torch.randn(2, 2, 8, 0)), "v must have a non-empty head dim Dv"),
    (dict(sinks=torch.randn(2)), r"sinks must have shape \[Hq=4\]"),
    (dict(sinks=torch.randn(1, 4)), r"sinks must have shape \[Hq=4\]"),
    (dict(sinks=[0.0] * 4), "sinks must be a torch.Tensor"),
    (dict(sinks=torch.zeros(4, dtype=torch.long)), "sinks must be a float tensor"),
    (dict(sinks=torch.tensor([0.0, float("inf"), 1.0, 2.0])), "sinks must be finite"),
    (dict(sinks=torch.tensor([0.0, float("nan"), 1.0, 2.0])), "sinks must be finite"),
    (dict(sinks=torch.zeros(4, device="meta")), "sinks is on meta"),
]


@pytest.mark.parametrize("bad, match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_input_raises_value_error(bad, match, backend):
    kwargs = {**good(), "backend": backend, **bad}
    with pytest.raises(ValueError, match=match):
        ak.label_attention(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_value_head_dim_of_its_own_is_accepted(backend):
    """v [B, Hkv, N, Dv] with Dv != D (DeepSeek's multi-head latent attention): out is [B, Hq, N, Dv]."""
    out, _ = ak.label_attention(**{**good(), "v": torch.randn(2, 2, 8, 7)}, backend=backend)
    assert out.shape == (2, 4, 8, 7)
