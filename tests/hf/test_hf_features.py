"""The Hugging Face integration beyond the per-family equivalence: registration, refusals, sliding windows,
gradient checkpointing, half precision, fused QKV value slices and LoRA."""
from __future__ import annotations

import copy
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import abft_kernels.hf.attention as hf_attention  # noqa: E402
from abft_kernels.hf import LabelSpec, apply_abft, trainable_qk  # noqa: E402

from helpers import rel_err  # noqa: E402
import hf_families  # noqa: E402
from test_hf_models import (  # noqa: E402
    FAMILIES, NUM_CLASSES, TRANSFORMERS_4, abft_loss_of, icl_batch, masses_from_abft, masses_from_eager, tiny_model,
    trained_grads, with_implementation,
)

ROOT = Path(__file__).resolve().parents[2]
needs_transformers_5 = pytest.mark.skipif(TRANSFORMERS_4, reason="abft on Falcon needs transformers 5")


def run_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_import_registers_lazily():
    run_python(
        "import sys, abft_kernels\n"
        "assert 'transformers.modeling_utils' not in sys.modules, 'import abft_kernels loaded transformers'\n"
        "from transformers.modeling_utils import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'abft' in AttentionInterface._global_mapping and 'abft' in AttentionMaskInterface._global_mapping\n")


def test_package_imports_without_transformers():
    run_python(
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, abft_kernels\n"
        "from abft_kernels.hf import LabelSpec\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "out, mass = abft_kernels.label_attention(q, q, q, torch.zeros(1, 5, dtype=torch.long), 1)\n"
        "assert mass.shape == (1, 2, 5, 1)\n")


def test_label_spec_rejects_bad_arguments():
    key_class = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="key_class"):
        LabelSpec(key_class.float(), None, 2)
    with pytest.raises(ValueError, match="query_rows"):
        LabelSpec(key_class, torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_classes"):
        LabelSpec(key_class, None, 0)
    with pytest.raises(ValueError, match="backend"):
        LabelSpec(key_class, None, 2, backend="nope")


@pytest.fixture(scope="module")
def llama():
    return apply_abft(tiny_model("llama"))


def test_refusals(llama):
    input_ids, mask, key_class, rows, _ = icl_batch()
    spec = LabelSpec(key_class, rows, NUM_CLASSES)
    with pytest.raises(ValueError, match="key_class"):  # the spec must cover the sequence
        llama(input_ids[:, :-1], attention_mask=mask[:, :-1], abft=spec, output_attentions=True)
    with pytest.raises(ValueError, match="LabelSpec"):
        llama(input_ids, attention_mask=mask, abft=key_class, output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions"):
        llama(input_ids, attention_mask=mask, abft=spec)
    # transformers 5 renames past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(type(llama).forward).parameters else "past_key_values"
    cache = transformers.DynamicCache()
    llama(input_ids[:, :5], attention_mask=mask[:, :5], use_cache=True, **{cache_arg: cache})
    tail_spec = LabelSpec(key_class[:, 5:], None, NUM_CLASSES)
    with pytest.raises(ValueError, match="whole sequence"):
        llama(input_ids[:, 5:], attention_mask=mask, abft=tail_spec, output_attentions=True, **{cache_arg: cache})


def test_attention_dropout_refused_with_labels():
    gpt2 = apply_abft(tiny_model("gpt2", bos_token_id=1, eos_token_id=1)).train()  # attn_pdrop 0.1
    input_ids, mask, key_class, rows, _ = icl_batch()
    gpt2(input_ids, attention_mask=mask)  # plain attention keeps its dropout
    with pytest.raises(ValueError, match="dropout"):
        gpt2(input_ids, attention_mask=mask, abft=LabelSpec(key_class, rows, NUM_CLASSES), output_attentions=True)


def test_softcapping_refused():
    gemma2 = apply_abft(tiny_model("gemma2", attn_logit_softcapping=50.0))
    input_ids, mask, key_class, rows, _ = icl_batch()
    for spec in (None, LabelSpec(key_class, rows, NUM_CLASSES)):
        with pytest.raises(ValueError, match="soft-capping"):
            gemma2(input_ids, attention_mask=mask, abft=spec, output_attentions=True)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_shorter_than_sequence(family):
    reference = tiny_model(family, attn_implementation="sdpa", sliding_window=5)
    abft = with_implementation(reference, "abft")
    input_ids, mask, key_class, rows, _ = icl_batch()
    real = mask.bool()
    with torch.no_grad():
        assert rel_err(abft(input_ids, attention_mask=mask).logits[real],
                       reference(input_ids, attention_mask=mask).logits[real]) < 1e-5
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)  # decodes past the window
    left_padded = dict(input_ids=input_ids[[0, 2]], attention_mask=mask[[0, 2]])
    assert torch.equal(abft.generate(**left_padded, **settings), reference.generate(**left_padded, **settings))
    with pytest.raises(ValueError, match="sliding window"):
        abft(input_ids, attention_mask=mask, abft=LabelSpec(key_class, rows, NUM_CLASSES), output_attentions=True)


def count_label_attention_calls(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return label_attention(*args, **kwargs)

    label_attention = hf_attention.label_attention
    monkeypatch.setattr(hf_attention, "label_attention", counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2", pytest.param("falcon", marks=needs_transformers_5),
                                    pytest.param("stablelm_qk_norm", marks=needs_transformers_5)])
def test_gradient_checkpointing_recompute_sees_labels(family, monkeypatch):
    no_dropout = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0) if family == "gpt2" else {}
    eager = tiny_model(family, **no_dropout)
    abft = with_implementation(eager, "abft")
    trainable_qk(eager)
    trainable_qk(abft)
    abft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    abft.train()
    input_ids, mask, key_class, rows, target = icl_batch()
    _, eager_masses = masses_from_eager(eager, input_ids, mask, key_class, rows)
    calls = count_label_attention_calls(monkeypatch)
    _, abft_masses = masses_from_abft(abft, input_ids, mask, key_class, rows)
    assert len(calls) == 2
    abft_loss_of(eager_masses, key_class, rows, target, mask)[0].backward()
    abft_loss_of(abft_masses, key_class, rows, target, mask)[0].backward()
    assert len(calls) == 4, "the backward pass did not recompute the layers with their labels"
    want, got = trained_grads(eager), trained_grads(abft)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_reentrant_checkpointing_refused():
    abft = apply_abft(tiny_model("llama"))
    trainable_qk(abft)
    abft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    abft.train()
    input_ids, mask, key_class, rows, _ = icl_batch()
    with pytest.raises(ValueError, match="use_reentrant"):
        masses_from_abft(abft, input_ids, mask, key_class, rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    eager = tiny_model("qwen2")
    half = with_implementation(eager, "abft").to(dtype)
    half_sdpa = with_implementation(eager, "sdpa").to(dtype)
    input_ids, mask, key_class, rows, _ = icl_batch()
    _, want = masses_from_eager(eager, input_ids, mask, key_class, rows)
    out, got = masses_from_abft(half, input_ids, mask, key_class, rows)
    for layer in range(len(want)):
        assert got[layer].dtype == torch.float32
        assert rel_err(got[layer], want[layer]) < 1e-2
    real = mask.bool()
    plain = half(input_ids, attention_mask=mask).logits
    assert plain.dtype == dtype
    assert rel_err(plain[real], half_sdpa(input_ids, attention_mask=mask).logits[real]) < 1e-2
    assert rel_err(out.logits[real], plain[real]) < 1e-2


FUSED = [  # (family, overrides, value features per layer of the fused projection)
    ("gpt2", dict(bos_token_id=1, eos_token_id=1), 32),  # c_attn [q | k | v], E each
    ("gpt_neox", {}, 32),  # per head [q | k | v]
    ("phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=1), 16),  # [q | k | v], Hkv * d values
    pytest.param("falcon", {}, 8, marks=needs_transformers_5),  # multi-query: one shared kv head
    pytest.param("falcon_mha", {}, 32, marks=needs_transformers_5),
    pytest.param("falcon_gqa", {}, 16, marks=needs_transformers_5),  # 2 kv heads
    ("gpt_bigcode", dict(multi_query=False), 64),  # per head [q | k | v] (hidden 64 in hf_families)
    ("gpt_bigcode", dict(multi_query=True), 16),  # [q (E) | k (d) | v (d)]
    pytest.param("codegen", {}, 64, marks=pytest.mark.skipif(  # qkv_proj in mp_num blocks of [q | v | k]
        TRANSFORMERS_4, reason="transformers 4.57's CodeGen computes its own attention: refused (family matrix)")),
]


def build(family, overrides):
    """A tiny eager model: test_hf_models' hand-written configs, else hf_families' generic tiny config."""
    if family in FAMILIES:
        return tiny_model(family, **overrides)
    return hf_families.tiny_model(family, **overrides)


def first_parametrized(model):
    for name, module in model.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            return name, module
    raise AssertionError("no projection with split output features")


def eager_masses(model, batch):
    input_ids, mask, key_class, rows, _ = batch
    out = model(input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    return out, hf_families.masses_from_weights(out.attentions, key_class, rows)


@pytest.mark.parametrize("family, overrides, value_features", FUSED)
def test_fused_qkv_value_features(family, overrides, value_features):
    """trainable_qk finds the value features of a fused projection: changing them leaves the first layer's masses
    as they are and moves the logits; changing the trained features moves the masses. An AdamW with weight decay
    never moves the value features (they are a buffer, not a trained tensor) and does move the trained ones."""
    model = build(family, overrides)
    trained = trainable_qk(model)
    name, projection = first_parametrized(model)
    split = projection.parametrizations.weight[0]
    assert split.frozen_index.numel() == value_features
    batch = hf_families.icl_batch(model.config.vocab_size)
    out, masses = eager_masses(model, batch)

    def after_adding_noise(tensor_name):
        perturbed = copy.deepcopy(model)
        module = dict(perturbed.named_modules())[name]
        tensor = getattr(module.parametrizations.weight, tensor_name) if tensor_name == "original" \
            else module.parametrizations.weight[0].frozen
        with torch.no_grad():
            tensor.add_(torch.randn_like(tensor))
        return eager_masses(perturbed, batch)

    new_out, new_masses = after_adding_noise("frozen")
    assert rel_err(new_masses[0], masses[0]) < 1e-6 and rel_err(new_out.logits, out.logits) > 1e-3
    _, new_masses = after_adding_noise("original")
    assert rel_err(new_masses[0], masses[0]) > 1e-3

    before = projection.weight.detach().clone()
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        _, masses = eager_masses(model, batch)
        hf_families.abft_loss_per_layer(masses, batch[2], batch[3], batch[4], batch[1])[0].backward()
        optimizer.step()
    after = projection.weight.detach()
    axis = split.axis
    assert torch.equal(after.index_select(axis, split.frozen_index), before.index_select(axis, split.frozen_index))
    assert not torch.equal(after.index_select(axis, split.trained_index),
                           before.index_select(axis, split.trained_index))


def test_multi_head_latent_attention_projections():
    """Low-rank projections (DeepSeek-V3): q_a_proj and q_b_proj feed the queries only; of kv_a_proj_with_mqa only
    the rotary key part (the last qk_rope_head_dim features) is trained (the rest feeds keys and values through
    kv_b_proj); of kv_b_proj, per head, the qk_nope_head_dim key features and not the v_head_dim value ones."""
    model = hf_families.tiny_model("deepseek_v3")
    config = model.config
    trainable_qk(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n}
    prefix = "model.layers.0.self_attn."
    assert trained == {prefix + "q_a_proj.weight", prefix + "q_b_proj.weight",
                       prefix + "kv_a_proj_with_mqa.parametrizations.weight.original",
                       prefix + "kv_b_proj.parametrizations.weight.original"}
    attention = model.model.layers[0].self_attn
    rope = attention.kv_a_proj_with_mqa.parametrizations.weight[0].trained_index
    assert torch.equal(rope, torch.arange(config.kv_lora_rank, config.kv_lora_rank + config.qk_rope_head_dim))
    per_head = config.qk_nope_head_dim + config.v_head_dim
    keys = torch.arange(config.num_attention_heads)[:, None] * per_head + torch.arange(config.qk_nope_head_dim)
    assert torch.equal(attention.kv_b_proj.parametrizations.weight[0].trained_index, keys.flatten())


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("gpt2", dict(bos_token_id=1, eos_token_id=1))])
def test_lora_on_query_key(family, overrides):
    pytest.importorskip("peft")
    eager = tiny_model(family, **overrides)
    abft = with_implementation(eager, "abft")
    torch.manual_seed(1)
    trained = trainable_qk(eager, lora=4)
    torch.manual_seed(1)
    trainable_qk(abft, lora=4)
    assert {n for n, p in eager.named_parameters() if p.requires_grad} == \
        {n for n, p in eager.named_parameters() if "lora_" in n}
    assert len(trained) == 2 * 2 * (2 if family == "llama" else 1)  # A and B per projection, 2 layers
    with torch.no_grad():  # peft starts lora_B at zero, which would leave lora_A without a gradient
        for p in trained:
            p.normal_(0.0, 0.1)
        for (_, a), (_, b) in zip(sorted(_trained(eager).items()), sorted(_trained(abft).items())):
            b.copy_(a)
    input_ids, mask, key_class, rows, target = icl_batch()
    _, eager_masses_ = masses_from_eager(eager, input_ids, mask, key_class, rows)
    _, abft_masses = masses_from_abft(abft, input_ids, mask, key_class, rows)
    abft_loss_of(eager_masses_, key_class, rows, target, mask)[0].backward()
    abft_loss_of(abft_masses, key_class, rows, target, mask)[0].backward()
    want, got = trained_grads(eager), trained_grads(abft)
    assert want and all(want[name].norm() > 0 for name in want)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name
    if family == "gpt2":  # fused c_attn: the adapter's value rows are a frozen buffer, moved by no optimizer
        lora_b = [m for n, m in eager.named_modules() if n.endswith("lora_B.default")]
        assert lora_b and all(m.parametrizations.weight[0].frozen_index.numel() == 32 for m in lora_b)
        before = [m.weight.detach().clone() for m in lora_b]
        optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            _, masses = masses_from_eager(eager, input_ids, mask, key_class, rows)
            abft_loss_of(masses, key_class, rows, target, mask)[0].backward()
            optimizer.step()
        for m, old in zip(lora_b, before):
            frozen = m.parametrizations.weight[0].frozen_index
            assert torch.equal(m.weight[frozen], old[frozen]) and not torch.equal(m.weight, old)


def _trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers 5 supports Falcon")
def test_falcon_refused_on_transformers_4():
    with pytest.raises(ValueError, match="Falcon needs transformers 5"):
        apply_abft(tiny_model("falcon"))


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 4.57's JetMoE computes its own attention: refused at load")
def test_trainable_qk_refuses_queries_from_stacked_expert_weights():
    """JetMoE's mixture of attention heads computes its queries from experts.input_linear (stacked weights, no
    nn.Linear): trainable_qk would train only the key half of kv_proj, so it refuses."""
    jetmoe = hf_families.tiny_model("jetmoe")
    with pytest.raises(ValueError, match="jetmoe's JetMoeAttention: its query states come from no nn.Linear"):
        trainable_qk(jetmoe)


def test_sinks_with_a_sliding_window_under_autocast_match_eager():
    """gpt-oss's plain attention with sinks and a window shorter than the prompt (the eager-softmax path) under
    CPU bf16 autocast: it masks in the scores' dtype (bf16), not q's (fp32, whose min overflows bf16)."""
    overrides = hf_families.window_overrides("gpt_oss")
    eager = hf_families.tiny_model("gpt_oss", **overrides)
    abft = copy.deepcopy(eager)
    abft.set_attn_implementation("abft")
    input_ids, mask, *_ = icl_batch()
    input_ids = input_ids % eager.config.vocab_size
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = eager(input_ids, attention_mask=mask, use_cache=False).logits
        got = abft(input_ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert rel_err(got[real].float(), want[real].float()) < 1e-2
