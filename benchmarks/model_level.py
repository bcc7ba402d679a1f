"""Model level: one ABFT training step (forward with masses, abft_loss, backward) on a random-initialised Llama.

Only W_Q and W_K train, as in the paper, so backward computes their gradients and the activation
gradients that reach them; there is no optimizer step and no LM head (the ABFT loss needs neither).
The `sdpa` method is the baseline without masses: plain SDPA attention and a stand-in loss on the query
token's last hidden state, so its memory is that of ordinary training of the same parameters.
The prompt is laid out like the kernel level's (benchmarks/shapes.py): random token ids, a label token of
a random class every DEMO_LEN tokens (token id = class id), the query is the last token, its gold class random.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import abft_kernels as ak
from abft_kernels.hf import LabelSpec, apply_abft, trainable_qk
from abft_kernels.ops.label_attention import gather_rows, label_one_hot

from .shapes import label_positions
from .timing import guarded, peak_memory_gib, saved_bytes, too_big, wall_median_ms

# Shapes of public checkpoints; the weights are random (timing needs no trained weights).
MODEL_CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
}
FULL_GPU_MODELS = ("llama-3.2-1b", "llama-3-8b")
CPU_MODELS = ("smollm2-135m",)
FULL_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SEQ_LENS = (256,)
NUM_CLASSES = 4
DEMO_LEN = 64


@dataclass
class ModelBatch:
    input_ids: torch.Tensor  # [B, N]
    key_class: torch.Tensor  # [B, N], -1 = not a label token
    query_rows: torch.Tensor  # [B, 1]: the last token
    target_class: torch.Tensor  # [B, 1]


def make_batch(vocab_size: int, seq_len: int, device: torch.device, batch: int = 1, seed: int = 0) -> ModelBatch:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(NUM_CLASSES, vocab_size, (batch, seq_len), generator=gen)
    labels = label_positions(seq_len, DEMO_LEN)
    classes = torch.randint(0, NUM_CLASSES, (batch, len(labels)), generator=gen)
    input_ids[:, labels] = classes
    key_class = torch.full((batch, seq_len), -1, dtype=torch.long)
    key_class[:, labels] = classes
    query_rows = torch.full((batch, 1), seq_len - 1, dtype=torch.long)
    target_class = torch.randint(0, NUM_CLASSES, (batch, 1), generator=gen)
    return ModelBatch(*(t.to(device) for t in (input_ids, key_class, query_rows, target_class)))


# Each method switches the model's attention and returns (the model's keyword arguments for one call,
# a function from the model's outputs to the per-layer masses [B,H,R,C]).
def eager_masses(model, batch: ModelBatch):
    model.set_attn_implementation("eager")
    one_hot = label_one_hot(batch.key_class, NUM_CLASSES, torch.bool)[:, None]

    def masses(outputs):
        result = []
        for probs in outputs.attentions:  # [B, H, N, N]
            result.append((gather_rows(probs, batch.query_rows) @ one_hot.to(probs.dtype)).float())
        return result

    return {}, masses


def no_masses(model, batch: ModelBatch):
    model.set_attn_implementation("sdpa")
    return {}, None


def hf_masses(backend: str):
    def setup(model, batch: ModelBatch):
        apply_abft(model)
        spec = LabelSpec(batch.key_class, batch.query_rows, NUM_CLASSES, backend=backend)
        return {"abft": spec}, lambda outputs: list(outputs.attentions)

    return setup


@dataclass(frozen=True)
class ModelMethod:
    name: str
    description: str
    backend: Optional[str]  # label_attention backend, None for eager and plain SDPA
    setup: Callable
    computes_masses: bool = True


MODEL_METHODS = {m.name: m for m in (
    ModelMethod("eager", "attn_implementation='eager', output_attentions=True, masses = P[query]·Y", None,
                eager_masses),
    ModelMethod("sdpa", "attn_implementation='sdpa', no masses: ordinary training of W_Q, W_K (a stand-in loss "
                "on the query token's last hidden state)", None, no_masses, computes_masses=False),
    ModelMethod("sdpa_torch", "attn_implementation='abft' with LabelSpec(backend='torch'): SDPA + row recompute",
                "torch", hf_masses("torch")),
    ModelMethod("abft", "attn_implementation='abft' with LabelSpec(backend='auto'): the default", "auto",
                hf_masses("auto")),
)}


def build_model(name: str, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                num_layers: Optional[int] = None, checkpointing: bool = False):
    """The model of MODEL_CONFIGS[name] with random weights; num_layers (default: all of them) keeps the first ones;
    checkpointing: gradient checkpointing (non-reentrant), which long prompts need where activations, not
    attention, fill the memory."""
    from transformers import LlamaConfig, LlamaModel

    shape = {**MODEL_CONFIGS[name], **({} if num_layers is None else {"num_hidden_layers": num_layers})}
    config = LlamaConfig(**shape, max_position_embeddings=max_seq_len, attn_implementation="eager")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel._from_config(config, dtype=dtype)
    trainable_qk(model)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def eager_memory(model, seq_len: int) -> float:
    """The weights plus every layer's returned P (input dtype) and the fp32 softmax it came from."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = torch.finfo(model.dtype).bits // 8
    return weights + config.num_hidden_layers * config.num_attention_heads * seq_len ** 2 * (elem + 4)


def step_loss(model, batch: ModelBatch, kwargs: dict, masses_of):
    """The forward half of a step: the loss and the mean label mass S over layers and heads (loss is 0 until a head
    passes the induction filter, so S is what shows that methods agree on a random model). masses_of None (plain
    training): loss = mean square of the query token's last hidden state, S = None."""
    outputs = model(input_ids=batch.input_ids, output_attentions=masses_of is not None, use_cache=False, **kwargs)
    if masses_of is None:
        query_state = gather_rows(outputs.last_hidden_state[:, None], batch.query_rows)
        return query_state.float().square().mean(), None
    loss, info = ak.abft_loss(masses_of(outputs), batch.target_class, batch.key_class, batch.query_rows)
    return loss, info.label_mass.mean()


def abft_step(model, batch: ModelBatch, kwargs: dict, masses_of):
    """One step: step_loss, backward, zero_grad. Returns the loss and S (see step_loss)."""
    loss, label_mass = step_loss(model, batch, kwargs, masses_of)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach(), label_mass


def resolved_backend(method: ModelMethod, name: str, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """{"backend": the label_attention backend the method's abft= calls run on, "backend_reason": why}, or None for
    methods without masses; resolved on the step's own shape (one prompt of seq_len tokens, its last row), with
    broadcast (unallocated) stand-ins for q, k and v."""
    if method.backend is None:
        return {"backend": None, "backend_reason": None}
    config = MODEL_CONFIGS[name]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    q = torch.zeros(1, config["num_attention_heads"], 1, head_dim, device=device, dtype=dtype).expand(
        -1, -1, seq_len, -1)
    k = torch.zeros(1, config["num_key_value_heads"], 1, head_dim, device=device, dtype=dtype).expand(
        -1, -1, seq_len, -1)
    key_class = torch.full((1, seq_len), -1, device=device)
    query_rows = torch.full((1, 1), seq_len - 1, device=device)
    choice = ak.resolve_backend(q, k, k, key_class, NUM_CLASSES, query_rows=query_rows, backend=method.backend)
    return {"backend": choice.name, "backend_reason": choice.reason}


def sweep_model(name: str, methods: list, seq_lens: list, device: torch.device, dtype: torch.dtype, reps: int,
                memory_limit: Optional[float] = None, num_layers: Optional[int] = None,
                done: Callable[[dict], bool] = lambda row: False,
                not_run: Callable[[dict], Optional[dict]] = lambda row: None,
                measure: Optional[Callable[[dict], dict]] = None, checkpointing: Optional[bool] = None):
    """Yields the result row of every (N, method) on model `name` (see measure_model), with num_layers of its
    layers (default: all). Rows for which done(row) is true are left out; a row for which not_run(row) gives
    a status and reason is yielded with them, unmeasured. measure(row) gives the result fields of a row measured
    elsewhere (benchmarks.run --isolate: in a fresh process); by default the model is built here for the first
    row measured and measure_model measures it (memory_limit: see there). checkpointing: gradient checkpointing
    (default: on CUDA only, where activations limit long prompts on big models)."""
    checkpointing = device.type == "cuda" if checkpointing is None else checkpointing
    layers = num_layers or MODEL_CONFIGS[name]["num_hidden_layers"]
    built = None
    for seq_len in seq_lens:
        for method in methods:
            row = {"level": "model", "model": name, "method": method.name, **resolved_backend(method, name, seq_len, device, dtype),
                   "seq_len": seq_len,
                   "batch": 1, "num_demos": (seq_len - 1) // DEMO_LEN, "num_classes": NUM_CLASSES,
                   "dtype": str(dtype)[6:], "gradient_checkpointing": checkpointing, "num_layers": layers,
                   "model_num_layers": MODEL_CONFIGS[name]["num_hidden_layers"]}
            if done(row):
                continue
            reason = not_run(row)
            if reason is not None:
                yield {**row, **reason}
                continue
            if measure is not None:
                yield {**row, **measure(row)}
                continue
            if built is None:
                built = guarded(lambda: {"model": build_model(name, device, dtype, max(seq_lens), num_layers,
                                                                checkpointing)}, device)
            if "model" not in built:
                yield {**row, "status": built["status"], "reason": "building the model failed: " + built["reason"]}
            else:
                yield {**row, **measure_model(built["model"], method, seq_len, device, reps, memory_limit)}


def peak_rss_gib() -> float:
    """The peak resident memory of this process so far (ru_maxrss), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


def measure_model(model, method: ModelMethod, seq_len: int, device: torch.device, reps: int,
                  memory_limit: Optional[float] = None) -> dict:
    """Status and, when ok: median_ms of `reps` steps after one warm-up step, peak_memory_gib (None off
    CUDA), saved_gib (the storages autograd keeps for backward in the warm-up step's forward, each counted once;
    weights included), peak_rss_gib (this process's peak resident memory after the steps: the point's own peak
    when it runs in a fresh process, --isolate), the 1-minute load average after the steps (other work on the
    machine slows CPU timings), the warm-up step's loss and mean label mass (the same for every method that
    computes masses, up to rounding; None for plain SDPA) and weights_gib, the bytes of the weights (part of
    every peak). memory_limit (bytes, default 90% of the device's memory): eager is skipped when its estimate
    exceeds it."""
    reason = too_big(eager_memory(model, seq_len), device, memory_limit) if method.name == "eager" else None
    if reason is not None:
        return {"status": "skipped", "reason": reason}

    def measure():
        batch = make_batch(model.config.vocab_size, seq_len, device)
        kwargs, masses_of = method.setup(model, batch)

        def step():
            abft_step(model, batch, kwargs, masses_of)

        saved, (loss, label_mass) = saved_bytes(lambda: step_loss(model, batch, kwargs, masses_of))
        loss.backward()
        model.zero_grad(set_to_none=True)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        median_ms = wall_median_ms(step, device, 0, reps)
        return {"median_ms": median_ms, "peak_memory_gib": peak_memory_gib(step, device),
                "saved_gib": saved / 2 ** 30, "peak_rss_gib": peak_rss_gib(),
                "load_average_1min": round(os.getloadavg()[0], 2), "loss": loss.item(),
                "mean_label_mass": None if label_mass is None else label_mass.item(), "weights_gib": weights / 2 ** 30}

    return guarded(measure, device)
