"""Memory kept for backward grows as O(N), never O(N²), in every backend that runs on CPU (issue 13).

Deterministic bytes, not timings: every tensor autograd saves during one forward is seen by a
saved_tensors_hooks pack hook, and each storage is counted once (views of q share q's storage). The bytes at
2N must stay within 2.2x of those at N. A [B,1,N,N] mask kept per layer (the bug of issue 13: padded chunks'
masks saved by SDPA's autograd) makes them grow about 3.5x at these sizes.

Backends: torch; triton (under TRITON_INTERPRET=1); cuda's autograd glue around the stand-in extension of
test_cuda_extension (its output path is torch's padded SDPA). The reference backend is left out: it
materialises P in float64 by design (O(N²), tests only).
"""
import gc
import weakref

import pytest
import torch

import abft_kernels as ak
from abft_kernels.ops.label_attention import sdpa
from benchmarks.timing import saved_bytes
from helpers import assert_matches_reference, make_problem
from test_cuda_extension import cuda_backend_with_stand_in  # noqa: F401  (a fixture)

SEQ_LEN = 128
MAX_GROWTH = 2.2


def step_saved_bytes(seq_len: int, backend: str, padding: str, rows: str) -> int:
    """Bytes autograd keeps from one label_attention forward for its backward; rows "output" = every mass slot empty (-1): the output path."""
    problem = make_problem(batch=2, heads=2, kv_heads=1, seq_len=seq_len, head_dim=8, num_classes=3, padding=padding,
                           rows="all" if rows == "all" else "last", seed=seq_len)
    if rows == "output":
        problem["query_rows"] = torch.full((2, 1), -1)
    leaves = {name: problem[name].requires_grad_(True) for name in ("q", "k", "v")}

    return saved_bytes(lambda: ak.label_attention(**{**problem, **leaves}, backend=backend))[0]


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not ak.backend_available("triton"), reason="triton is not installed")), "cuda"]


@pytest.fixture
def backend_on_cpu(request):
    """The backend name; "cuda" runs its glue around the CPU stand-in extension."""
    if request.param == "cuda":
        request.getfixturevalue("cuda_backend_with_stand_in")
    return request.param


@pytest.mark.parametrize("backend_on_cpu", BACKENDS, indirect=True)
@pytest.mark.parametrize("padding", ["none", "left", "right", "both"])
@pytest.mark.parametrize("rows", ["last", "all", "output"])
def test_saved_bytes_grow_linearly(backend_on_cpu, padding, rows):
    small = step_saved_bytes(SEQ_LEN, backend_on_cpu, padding, rows)
    large = step_saved_bytes(2 * SEQ_LEN, backend_on_cpu, padding, rows)
    assert large <= MAX_GROWTH * small, (
        f"backend={backend_on_cpu}, padding={padding}, rows={rows}: autograd saves {small} bytes at N={SEQ_LEN} and "
        f"{large} at N={2 * SEQ_LEN} ({large / small:.2f}x > {MAX_GROWTH}x): something O(N²) is kept for backward")


@pytest.mark.parametrize("padding", ["left", "both"])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_padded_sdpa_in_several_chunks_matches_reference(monkeypatch, padding, rows):
    """The padded output path split into chunks of 7 rows (forward and the per-chunk recompute of backward)."""
    problem = make_problem(heads=4, kv_heads=2, seq_len=45, head_dim=8, num_classes=3, padding=padding, rows=rows,
                           seed=11)
    monkeypatch.setattr(sdpa, "_CHUNK_ELEMENTS", 2 * 4 * 45 * 7)
    assert_matches_reference(problem, "torch")


@pytest.mark.parametrize("backend_on_cpu", BACKENDS, indirect=True)
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_backward_frees_q_k_v_while_the_graph_lives(backend_on_cpu, padding, rows):
    """After backward nothing keeps q, k, v alive, even while the loss (and so the graph) is still referenced, as a
    logged loss is: an autograd Function that kept them as ctx attributes held every layer's q, k, v."""
    problem = make_problem(batch=2, heads=2, kv_heads=1, seq_len=33, head_dim=8, num_classes=3, padding=padding,
                           rows=rows, seed=3)
    inputs = {name: problem[name].requires_grad_(True) * 1.0 for name in ("q", "k", "v")}  # a model's activations
    alive = [weakref.ref(t) for t in inputs.values()]
    out, mass = ak.label_attention(**{**problem, **inputs}, backend=backend_on_cpu)
    loss = out.sum() + mass.sum()
    loss.backward()
    del out, mass, inputs
    gc.collect()
    assert loss.grad_fn is not None
    assert [ref() is None for ref in alive] == [True, True, True], "q, k, v outlive backward"


def hf_step_saved_bytes(seq_len: int, with_labels: bool) -> int:
    """Bytes autograd keeps from one forward of a tiny Llama with attn_implementation="abft" on a left- and a
    right-padded prompt, with abft= (masses) or without (plain attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from abft_kernels.hf import LabelSpec, trainable_qk

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * seq_len,
                         attn_implementation="abft")
    model = LlamaForCausalLM(config)
    trainable_qk(model)
    input_ids = torch.randint(0, 64, (2, seq_len))
    mask = torch.ones(2, seq_len, dtype=torch.long)
    mask[0, :5], mask[1, -5:] = 0, 0
    kwargs = {}
    if with_labels:
        key_class = torch.full((2, seq_len), -1)
        key_class[:, 10::16] = 1
        kwargs = dict(abft=LabelSpec(key_class, torch.tensor([[seq_len - 1], [seq_len - 6]]), 2),
                      output_attentions=True)
    return saved_bytes(lambda: model(input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1, **kwargs))[0]


@pytest.mark.parametrize("with_labels", [False, True])
def test_hf_padded_batch_saves_linear_bytes(with_labels):
    """A padded batch through the HF integration, with or without masses: no [B, 1, N, N] mask is kept."""
    small, large = hf_step_saved_bytes(SEQ_LEN, with_labels), hf_step_saved_bytes(2 * SEQ_LEN, with_labels)
    assert large <= MAX_GROWTH * small, f"with_labels={with_labels}: {small} -> {large} bytes ({large / small:.2f}x)"


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("padding", ["none", "left"])
def test_row_recompute_creates_nothing_larger_than_q(padding):
    """The selected-rows path (ABFT's query row, auto's choice on CUDA) in bfloat16 with GQA: no intermediate of its
    forward or backward is larger than q itself: no fp32 copy of q or of dq, nothing N x N (an H200 run measured its
    transients; a whole fp32 copy of q and of dq cost 1 GiB per layer at N = 32768 in Llama-3-8B's shape)."""
    from abft_kernels.ops.label_attention.row_mass_torch import row_label_mass
    from abft_kernels.ops.label_attention.validation import validate_label_attention_args
    problem = make_problem(batch=2, heads=8, kv_heads=2, seq_len=512, head_dim=16, num_classes=3, padding=padding,
                           dtype=torch.bfloat16, seed=5)
    q, k = problem["q"].requires_grad_(True), problem["k"].requires_grad_(True)
    args = validate_label_attention_args(q, k, problem["v"], problem["key_class"], problem["num_classes"],
                                         problem["query_rows"], True, None, problem["key_padding_mask"], None)
    with _LargestOutput() as tracker:
        row_label_mass(args).square().sum().backward()
    assert tracker.largest <= q.numel() * q.element_size(), (tracker.largest, q.numel() * q.element_size())


def sink_model_saved_bytes(seq_len: int) -> int:
    """Bytes autograd keeps from one forward of a tiny gpt-oss (attention sinks, full attention in every layer) on a
    padded batch without abft= (the model's plain attention)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                          num_experts_per_tok=1, max_position_embeddings=2 * seq_len,
                          layer_types=["full_attention"] * 2, attn_implementation="abft")
    model = GptOssForCausalLM(config)
    input_ids = torch.randint(0, 64, (2, seq_len))
    mask = torch.ones(2, seq_len, dtype=torch.long)
    mask[0, :5], mask[1, -5:] = 0, 0
    return saved_bytes(lambda: model(input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1))[0]


def test_hf_sink_model_plain_attention_saves_linear_bytes():
    """Attention sinks without a sliding window go through SDPA with the sink as a virtual key: no N x N scores or
    probabilities are kept for backward."""
    small, large = sink_model_saved_bytes(SEQ_LEN), sink_model_saved_bytes(2 * SEQ_LEN)
    assert large <= MAX_GROWTH * small, f"{small} -> {large} bytes ({large / small:.2f}x)"
