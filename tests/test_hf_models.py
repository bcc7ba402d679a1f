"""attn_implementation="abft" on tiny random models of every supported family, against eager and sdpa."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import abft_kernels as ak  # noqa: E402  (registers "abft")
from abft_kernels.hf import LabelSpec, apply_abft  # noqa: E402

from helpers import rel_err  # noqa: E402

VOCAB, SEQ_LEN, NUM_CLASSES = 100, 13, 3
# Tiny configs: 2 layers, hidden 32 or 64, GQA where the family has it. initializer_range is raised so that
# attention is far from uniform and the masses differ between heads.
FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2),
}


def tiny_config(family: str, **overrides):
    kwargs = dict(FAMILIES[family], **overrides)
    model_type = kwargs.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, num_hidden_layers=2,
                                             initializer_range=0.2, **kwargs)


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
    """Three rows: left-padded, right-padded, unpadded. Almost every real token is a label, so that the
    induction filter counts heads; the query row is each sample's last real token."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (3, SEQ_LEN), generator=gen)
    mask = torch.ones(3, SEQ_LEN, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, -3:] = 0
    key_class = torch.randint(0, NUM_CLASSES, (3, SEQ_LEN), generator=gen)
    key_class[:, [0, 6]] = -1
    last_real = torch.tensor([[SEQ_LEN - 1], [SEQ_LEN - 4], [SEQ_LEN - 1]])
    target = torch.randint(0, NUM_CLASSES, (3, 1), generator=gen)
    return input_ids, mask, key_class, last_real, target


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


def qk_grads(model):
    return {name: p.grad for name, p in model.named_parameters()
            if p.grad is not None and any(part in name for part in ("q_proj", "k_proj"))}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_masses_and_qk_grads_match_eager(family):
    eager = tiny_model(family)
    abft = with_implementation(eager, "abft")
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
    want, got = qk_grads(eager), qk_grads(abft)
    assert want and sorted(got) == sorted(want)
    for name in want:
        assert want[name].norm() > 0
        assert rel_err(got[name], want[name]) < 1e-5, f"gradient of {name} differs from eager"


def test_from_config_registers_abft(family):
    model = tiny_model(family, attn_implementation="abft")
    assert model.config._attn_implementation == "abft"
    input_ids, mask, key_class, rows, _ = icl_batch()
    _, masses = masses_from_abft(model, input_ids, mask, key_class, rows)
    assert all(m.shape == (3, model.config.num_attention_heads, 1, NUM_CLASSES) for m in masses)


def test_plain_forward_and_generation_match_sdpa(family):
    sdpa = tiny_model(family, attn_implementation="sdpa")
    abft = with_implementation(sdpa, "abft")
    input_ids, mask, _, _, _ = icl_batch()
    real = mask.bool()
    with torch.no_grad():
        out = abft(input_ids, attention_mask=mask, output_attentions=True)
        want = sdpa(input_ids, attention_mask=mask)
    assert all(a is None for a in out.attentions or ())
    assert rel_err(out.logits[real], want.logits[real]) < 1e-6

    left_padded = input_ids[[0, 2]], mask[[0, 2]]  # generation pads on the left
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = abft.generate(left_padded[0], attention_mask=left_padded[1], **settings)
    assert torch.equal(tokens, sdpa.generate(left_padded[0], attention_mask=left_padded[1], **settings))
