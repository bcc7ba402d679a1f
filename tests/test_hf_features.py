"""The Hugging Face integration beyond the per-family equivalence: registration, refusals, sliding windows,
gradient checkpointing, half precision, fused QKV value slices and LoRA."""
from __future__ import annotations

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
from test_hf_models import (  # noqa: E402
    NUM_CLASSES, TRANSFORMERS_4, abft_loss_of, icl_batch, masses_from_abft, masses_from_eager, tiny_model,
    trained_grads, with_implementation,
)

ROOT = Path(__file__).resolve().parents[1]
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
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    for call_spec in (None, LabelSpec(key_class[:1], rows[:1], NUM_CLASSES)):
        with pytest.raises(ValueError, match="packed"):
            llama(input_ids[:1], position_ids=packed, abft=call_spec, output_attentions=True)


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


@pytest.mark.parametrize("family", ["llama", "gpt2", pytest.param("falcon", marks=needs_transformers_5)])
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


FUSED = [
    ("gpt2", dict(bos_token_id=1, eos_token_id=1), 32),  # value features per layer: E
    ("gpt_neox", {}, 32),  # H * d
    ("phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=1), 16),  # Hkv * d
    pytest.param("falcon", {}, 8, marks=needs_transformers_5),  # one shared kv head
    pytest.param("falcon_mha", {}, 32, marks=needs_transformers_5),
    pytest.param("falcon_gqa", {}, 16, marks=needs_transformers_5),  # 2 kv heads
]


def first_fused_weight(model):
    for name, param in model.named_parameters():
        if name.endswith(("c_attn.weight", "query_key_value.weight", "qkv_proj.weight")):
            return name, param
    raise AssertionError("no fused QKV weight")


@pytest.mark.parametrize("family, overrides, value_features", FUSED)
def test_fused_qkv_value_slice(family, overrides, value_features):
    """The features whose gradient trainable_qk zeroes feed the values only: changing them leaves the first
    layer's masses as they are and moves the logits; changing the other features moves the masses."""
    model = apply_abft(tiny_model(family, **overrides))
    trainable_qk(model)
    input_ids, mask, key_class, rows, _ = icl_batch()
    out, masses = masses_from_abft(model, input_ids, mask, key_class, rows)
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    name, weight = first_fused_weight(model)
    feature_dim = 1 if family == "gpt2" else 0  # Conv1D stores [in, out]
    other_dim = 1 - feature_dim
    frozen = (weight.grad == 0).all(dim=other_dim)
    assert int(frozen.sum()) == value_features

    def masses_and_logits_after(features):
        perturbed = with_implementation(model, "abft")
        w = dict(perturbed.named_parameters())[name]
        with torch.no_grad():
            w.index_add_(feature_dim, features.nonzero().flatten(), torch.randn_like(w.index_select(
                feature_dim, features.nonzero().flatten())))
        new_out, new_masses = masses_from_abft(perturbed, input_ids, mask, key_class, rows)
        return new_masses[0], new_out.logits

    layer0, logits = masses_and_logits_after(frozen)
    assert rel_err(layer0, masses[0]) < 1e-6 and rel_err(logits, out.logits) > 1e-3
    layer0, _ = masses_and_logits_after(~frozen)
    assert rel_err(layer0, masses[0]) > 1e-3


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
    input_ids, mask, key_class, rows, target = icl_batch()
    _, eager_masses = masses_from_eager(eager, input_ids, mask, key_class, rows)
    _, abft_masses = masses_from_abft(abft, input_ids, mask, key_class, rows)
    abft_loss_of(eager_masses, key_class, rows, target, mask)[0].backward()
    abft_loss_of(abft_masses, key_class, rows, target, mask)[0].backward()
    want, got = trained_grads(eager), trained_grads(abft)
    lora_b = [name for name in want if "lora_B" in name]
    assert lora_b and all(want[name].norm() > 0 for name in lora_b)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name
    if family == "gpt2":  # fused c_attn: the adapter's value rows stay frozen
        for name in lora_b:
            assert (want[name][64:] == 0).all() and (want[name][:64] != 0).any()


@pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers 5 supports Falcon")
def test_falcon_refused_on_transformers_4():
    with pytest.raises(ValueError, match="Falcon needs transformers 5"):
        apply_abft(tiny_model("falcon"))
