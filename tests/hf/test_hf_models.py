"""attn_implementation="abft" on tiny random models of every supported family, against eager and sdpa."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import abft_kernels as ak  # noqa: E402  (registers "abft")
from abft_kernels.hf import LabelSpec, apply_abft, trainable_qk  # noqa: E402

import hf_families  # noqa: E402
from helpers import rel_err  # noqa: E402

VOCAB = 100
SEQ_LEN, NUM_CLASSES = hf_families.SEQ_LEN, hf_families.NUM_CLASSES
# Tiny configs: 2 layers, hidden 32 or 64, GQA where the family has it. initializer_range is raised so that
# attention is far from uniform and the masses differ between heads.
_GQA = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama": dict(model_type="llama", **_GQA),
    "mistral": dict(model_type="mistral", **_GQA),
    "qwen2": dict(model_type="qwen2", **_GQA),
    "qwen3": dict(model_type="qwen3", head_dim=8, **_GQA),
    "gemma2": dict(model_type="gemma2", head_dim=8, attn_logit_softcapping=None, **_GQA),
    "gemma3": dict(model_type="gemma3_text", head_dim=8, **_GQA),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_attention_heads=4),
    "phi3": dict(model_type="phi3", pad_token_id=0, bos_token_id=1, eos_token_id=1, **_GQA),
    # Falcon's three fused QKV layouts: multi-query, multi-head, grouped (new decoder architecture).
    "falcon": dict(model_type="falcon", hidden_size=32, num_attention_heads=4, multi_query=True),
    "falcon_mha": dict(model_type="falcon", hidden_size=32, num_attention_heads=4, multi_query=False),
    "falcon_gqa": dict(model_type="falcon", hidden_size=32, num_attention_heads=4, new_decoder_architecture=True,
                       num_kv_heads=2),
    # Decoder layers that drop the call's keywords (the spec rides in the rotary embeddings, patching.py); StableLM
    # with and without its per-head query/key layer norms.
    "stablelm": dict(model_type="stablelm", **_GQA),
    "stablelm_qk_norm": dict(model_type="stablelm", qk_layernorm=True, **_GQA),
    "nemotron": dict(model_type="nemotron", **_GQA),
}
# Falcon's modelling code does not use transformers' AttentionInterface: apply_abft patches it (transformers 5).
NEEDS_APPLY_ABFT = {"falcon", "falcon_mha", "falcon_gqa"}
# Transformers 4.57 builds these from a table of attention classes with their own attention code: refused there.
OWN_ATTENTION_ON_4 = {"stablelm", "stablelm_qk_norm", "nemotron"}
NO_SDPA = {"gemma2"}  # transformers refuses sdpa for Gemma2; its plain path is checked against eager


def tiny_config(family: str, **overrides):
    kwargs = dict(FAMILIES[family], **overrides)
    model_type = kwargs.pop("model_type")
    kwargs = dict(dict(vocab_size=VOCAB, num_hidden_layers=2, initializer_range=0.2), **kwargs)
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str, attn_implementation: str = "eager", **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides),
                                                          attn_implementation=attn_implementation)
    return model.eval()


def with_implementation(model, attn_implementation: str):
    """A copy of `model` with the same weights under another attention implementation."""
    other = copy.deepcopy(model)
    if attn_implementation == "abft":
        return apply_abft(other)
    other.set_attn_implementation(attn_implementation)
    return other


def icl_batch(seed: int = 0):
    """Three rows (left-padded, right-padded, unpadded), as the family matrix builds them."""
    return hf_families.icl_batch(VOCAB, seed)


def masses_from_eager(model, input_ids, mask, key_class, rows):
    """Per-layer masses [B,H,R,C] summed from eager attention weights: the oracle."""
    out = model(input_ids, attention_mask=mask, output_attentions=True)
    one_hot = (key_class[:, :, None] == torch.arange(NUM_CLASSES)).to(torch.float32)
    masses = []
    for weights in out.attentions:
        picked = weights.gather(2, rows[:, None, :, None].expand(-1, weights.shape[1], -1, weights.shape[-1]))
        masses.append(picked @ one_hot[:, None])
    return out, masses


def masses_from_abft(model, input_ids, mask, key_class, rows):
    spec = LabelSpec(key_class=key_class, query_rows=rows, num_classes=NUM_CLASSES)
    out = model(input_ids, attention_mask=mask, abft=spec, output_attentions=True)
    return out, list(out.attentions)


def abft_loss_of(masses, key_class, rows, target, mask):
    loss, info = ak.abft_loss(masses, target, key_class, rows, key_padding_mask=mask.bool())
    return loss, info


def trained_grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


TRANSFORMERS_4 = transformers.__version__.startswith("4.")


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    if TRANSFORMERS_4 and request.param in NEEDS_APPLY_ABFT:
        pytest.skip("abft on Falcon needs transformers 5")
    if TRANSFORMERS_4 and request.param in OWN_ATTENTION_ON_4:
        pytest.skip(f"transformers 4.57's {request.param} computes its own attention: refused (family matrix)")
    return request.param


def test_masses_and_qk_grads_match_eager(family):
    eager = tiny_model(family)
    abft = with_implementation(eager, "abft")
    trainable_qk(eager)
    trainable_qk(abft)
    batch = icl_batch()
    input_ids, mask, key_class, rows, target = batch
    eager_out, eager_masses = masses_from_eager(eager, input_ids, mask, key_class, rows)
    abft_out, abft_masses = masses_from_abft(abft, input_ids, mask, key_class, rows)

    assert len(abft_masses) == len(eager_masses) == 2
    for layer, (got, want) in enumerate(zip(abft_masses, eager_masses)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(got, want) < 1e-5, f"layer {layer} masses differ from eager"
    real = mask.bool()
    assert rel_err(abft_out.logits[real], eager_out.logits[real]) < 1e-5

    eager_loss, info = abft_loss_of(eager_masses, key_class, rows, target, mask)
    abft_loss, _ = abft_loss_of(abft_masses, key_class, rows, target, mask)
    assert info.counted.any(), "no head passes the induction filter: the gradient check would be empty"
    assert rel_err(abft_loss, eager_loss) < 1e-5
    eager_loss.backward()
    abft_loss.backward()
    want, got = trained_grads(eager), trained_grads(abft)
    assert want and sorted(got) == sorted(want)
    for name in want:
        assert want[name] is not None and want[name].norm() > 0, name
        assert rel_err(got[name], want[name]) < 1e-5, f"gradient of {name} differs from eager"


def test_from_config_registers_abft(family):
    model = tiny_model(family, attn_implementation="abft")
    assert model.config._attn_implementation == "abft"
    input_ids, mask, key_class, rows, _ = icl_batch()
    _, masses = masses_from_abft(model, input_ids, mask, key_class, rows)
    assert all(m.shape == (3, model.config.num_attention_heads, 1, NUM_CLASSES) for m in masses)


def test_plain_forward_and_generation_match_sdpa(family):
    sdpa = tiny_model(family, attn_implementation="eager" if family in NO_SDPA else "sdpa")
    abft = with_implementation(sdpa, "abft")
    input_ids, mask, _, _, _ = icl_batch()
    real = mask.bool()
    with torch.no_grad():
        out = abft(input_ids, attention_mask=mask, output_attentions=True)
        want = sdpa(input_ids, attention_mask=mask)
    assert all(a is None for a in out.attentions or ())
    assert rel_err(out.logits[real], want.logits[real]) < 1e-5

    left_padded = input_ids[[0, 2]], mask[[0, 2]]  # generation pads on the left
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = abft.generate(left_padded[0], attention_mask=left_padded[1], **settings)
    assert torch.equal(tokens, sdpa.generate(left_padded[0], attention_mask=left_padded[1], **settings))
