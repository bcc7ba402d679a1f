"""attn_implementation="abft" on packed batches (padding-free packing: documents marked by cu_seq_lens_q/k, position
ids that restart or seq_idx) against each document run alone through eager attention; switching away from "abft";
chunked attention (Llama 4) with a KV cache against eager."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from abft_kernels.hf import LabelSpec, apply_abft  # noqa: E402
from abft_kernels.ops.label_attention import backend_available  # noqa: E402

import hf_families  # noqa: E402
from helpers import rel_err  # noqa: E402
from test_hf_models import NUM_CLASSES, VOCAB, masses_from_eager, tiny_model  # noqa: E402

LENGTHS = (6, 1, 9, 5)  # one packed row; a one-token document included


def documents(seed: int = 0):
    """Per document: input_ids [n], key_class [n] (label tokens of every class, -1 elsewhere), query row (its last
    token)."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in LENGTHS:
        ids = torch.randint(3, VOCAB, (n,), generator=gen)
        key_class = torch.full((n,), -1, dtype=torch.long)
        key_class[0:n - 1:2] = torch.arange(len(range(0, n - 1, 2))) % NUM_CLASSES
        docs.append((ids, key_class, n - 1))
    return docs


def packed(docs, how: str):
    """The packed row as DataCollatorWithFlattening(return_flash_attn_kwargs=True) builds it, keeping the keywords
    that `how` names: "collator" (position ids and cu_seq_lens), "cu_seq_lens" or "position_ids" only, or only
    the document ids "seq_idx" (as return_seq_idx=True gives them)."""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": ids.tolist()} for ids, _, _ in docs])
    keep = {"collator": ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"),
            "cu_seq_lens": ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"),
            "position_ids": ("position_ids",), "seq_idx": ()}[how]
    kwargs = {k: batch[k] for k in keep}
    if how == "seq_idx":
        kwargs["seq_idx"] = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(LENGTHS)])[None]
    starts = [0] + list(torch.tensor(LENGTHS).cumsum(0)[:-1].tolist())
    key_class = torch.cat([kc for _, kc, _ in docs])[None]
    rows = torch.tensor([[start + row for start, (_, _, row) in zip(starts, docs)] + [-1]])  # -1: an empty slot
    return batch["input_ids"], kwargs, key_class, rows


def alone(eager, docs):
    """Each document alone through eager attention: logits [N, V] of the packed row, masses per layer [H, R, C]
    (the empty slot 0), with autograd."""
    logits, masses = [], []
    for ids, key_class, row in docs:
        out, layer_masses = masses_from_eager(eager, ids[None], torch.ones(1, len(ids), dtype=torch.long),
                                              key_class[None], torch.tensor([[row]]))
        logits.append(out.logits[0])
        masses.append(torch.stack(layer_masses)[:, 0])  # [L, H, 1, C]
    masses.append(torch.zeros_like(masses[-1]))
    return torch.cat(logits), torch.cat(masses, dim=2)


def loss_of(logits, masses):
    """A fixed random function of the logits and of every mass, so that every gradient path counts."""
    gen = torch.Generator().manual_seed(1)
    return (logits * torch.randn(logits.shape, generator=gen)).sum() + \
        (masses * torch.randn(masses.shape, generator=gen)).sum()


@pytest.mark.parametrize("family,how", [("llama", "collator"), ("llama", "cu_seq_lens"), ("llama", "position_ids"),
                                        ("llama", "seq_idx"), ("gpt2", "collator"), ("qwen3", "collator")])
def test_packed_batch_equals_each_document_alone(family, how):
    """Logits without abft=, logits and masses with abft=, and their gradients: the packed row equals each
    document run alone through eager attention. GPT-2's absolute positions need the restarting position ids; rotary
    positions are relative, so Llama's documents may also be marked without them."""
    overrides = dict(bos_token_id=1, eos_token_id=1, attn_pdrop=0.0) if family == "gpt2" else {}
    eager = tiny_model(family, **overrides)
    abft = apply_abft(copy.deepcopy(eager))
    docs = documents()
    input_ids, kwargs, key_class, rows = packed(docs, how)
    want_logits, want_masses = alone(eager, docs)
    with torch.no_grad():
        for use_cache in (False, True):  # with a cache transformers builds no packed mask; without, it does
            got = abft(input_ids, use_cache=use_cache, **kwargs).logits[0]
            assert rel_err(got, want_logits) < 1e-5, f"logits without abft= (use_cache={use_cache})"

    out = abft(input_ids, abft=LabelSpec(key_class, rows, NUM_CLASSES), output_attentions=True, **kwargs)
    got_masses = torch.stack(out.attentions)[:, 0]
    assert rel_err(got_masses, want_masses) < 1e-5
    assert rel_err(out.logits[0], want_logits) < 1e-5
    loss_of(want_logits, want_masses).backward()
    loss_of(out.logits[0], got_masses).backward()
    for (name, want), got in zip(eager.named_parameters(), abft.parameters()):
        if want.grad is not None and want.grad.norm() > 0:
            assert rel_err(got.grad, want.grad) < 1e-4, f"gradient of {name}"


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_packed_masses_on_every_backend(backend):
    """Both row regimes: one query row per document (and an empty slot), and every row (query_rows=None)."""
    if not backend_available(backend):
        pytest.skip(f"{backend} is not available here")
    eager = tiny_model("llama")
    abft = apply_abft(copy.deepcopy(eager))
    docs = documents(seed=2)
    input_ids, kwargs, key_class, rows = packed(docs, "collator")
    _, want = alone(eager, docs)
    with torch.no_grad():
        out = abft(input_ids, abft=LabelSpec(key_class, rows, NUM_CLASSES, backend=backend), output_attentions=True,
                   **kwargs)
        assert rel_err(torch.stack(out.attentions)[:, 0], want) < 1e-5
        every_row = abft(input_ids, abft=LabelSpec(key_class, None, NUM_CLASSES, backend=backend),
                         output_attentions=True, **kwargs)
        for layer, got in enumerate(every_row.attentions):
            assert got.shape[2] == input_ids.shape[1]
            assert rel_err(got[:, :, rows[0, :-1]], out.attentions[layer][:, :, :-1]) < 1e-5


def test_packed_gradient_checkpointing_recompute_sees_the_documents():
    """Non-reentrant checkpointing recomputes each layer after the model call: the documents travel as the
    layers' cu_seq_lens keywords (also where only the position ids marked them)."""
    abft = apply_abft(tiny_model("llama"))
    docs = documents()
    input_ids, kwargs, key_class, rows = packed(docs, "position_ids")
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(abft).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids, abft=LabelSpec(key_class, rows, NUM_CLASSES), output_attentions=True,
                    use_cache=False, **kwargs)
        loss_of(out.logits[0], torch.stack(out.attentions)[:, 0]).backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        assert rel_err(recomputed, plain) < 1e-6


def test_packed_refusals():
    abft = apply_abft(tiny_model("llama"))
    docs = documents()
    input_ids, kwargs, key_class, rows = packed(docs, "collator")
    n = input_ids.shape[1]
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        abft(input_ids, cu_seq_lens_q=kwargs["cu_seq_lens_q"])
    with pytest.raises(ValueError, match="equal"):
        abft(input_ids, cu_seq_lens_q=kwargs["cu_seq_lens_q"], cu_seq_lens_k=torch.tensor([0, n], dtype=torch.int32))
    with pytest.raises(ValueError, match="cumulative"):
        cu = torch.tensor([0, 3, n - 1], dtype=torch.int32)
        abft(input_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="disagree"):
        cu = torch.tensor([0, 3, n], dtype=torch.int32)
        abft(input_ids, position_ids=kwargs["position_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="disagree"):
        abft(input_ids, seq_idx=(torch.arange(n) >= 3).int()[None], **kwargs)
    with pytest.raises(ValueError, match="spans two batch rows"):
        cu = torch.tensor([0, 3, 2 * n], dtype=torch.int32)
        abft(input_ids.repeat(2, 1), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    padded = torch.ones(1, n, dtype=torch.long)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="pads"):
        abft(input_ids, attention_mask=padded, **kwargs)
    # transformers 5 renames past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(type(abft).forward).parameters else "past_key_values"
    cache = transformers.DynamicCache()
    abft(input_ids[:, :3], use_cache=True, **{cache_arg: cache})
    with pytest.raises(ValueError, match="cached keys"):
        cu = torch.tensor([0, 2, n - 3], dtype=torch.int32)
        abft(input_ids[:, 3:], cu_seq_lens_q=cu, cu_seq_lens_k=cu, **{cache_arg: cache})
    windowed = apply_abft(tiny_model("mistral", sliding_window=4))
    with pytest.raises(ValueError, match="sliding window"):
        windowed(input_ids, abft=LabelSpec(key_class, rows, NUM_CLASSES), output_attentions=True, **kwargs)


def test_position_ids_that_do_not_restart():
    """Explicit position ids without a cache: transformers 4.57 then numbers the documents (all 0) in its mask
    function, which is no packing."""
    abft = apply_abft(tiny_model("llama"))
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = abft(input_ids, use_cache=False).logits
        got = abft(input_ids, position_ids=torch.arange(7)[None].expand(2, -1), use_cache=False).logits
    assert torch.equal(got, want)


def test_packed_mask_of_unseen_position_ids_refused():
    """A packed mask function whose documents the model call did not read (outside a model call here)."""
    from transformers import masking_utils as mu

    from abft_kernels.hf import abft_mask_function

    documents = torch.tensor([[0, 0, 1, 1, 1]])
    mask_function = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(documents))
    with pytest.raises(ValueError, match="packed sequences"):
        abft_mask_function(attention_mask=None, kv_length=5, mask_function=mask_function, batch_size=1)
    no_documents = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(documents * 0))
    assert abft_mask_function(attention_mask=None, kv_length=5, mask_function=no_documents, batch_size=1) is None


def test_switching_away_leaves_a_plain_model():
    """After set_attn_implementation("sdpa") the model computes what a model built with sdpa computes, packed
    batches included (transformers' packed mask from the position ids); switching back restores "abft"."""
    sdpa = tiny_model("llama", attn_implementation="sdpa")
    model = apply_abft(copy.deepcopy(sdpa))
    docs = documents()
    input_ids, kwargs, key_class, rows = packed(docs, "position_ids")
    model.set_attn_implementation("sdpa")
    only_queries = dict(cu_seq_lens_q=torch.tensor([0, 2, input_ids.shape[1]], dtype=torch.int32))
    with torch.no_grad():
        assert torch.equal(model(input_ids, use_cache=False, **kwargs).logits,
                           sdpa(input_ids, use_cache=False, **kwargs).logits)
        # sdpa ignores the flash-attention keywords, which the "abft" call checks would refuse
        assert torch.equal(model(input_ids, **only_queries).logits, sdpa(input_ids, **only_queries).logits)
    model.set_attn_implementation("abft")
    want_logits, want_masses = alone(tiny_model("llama"), docs)
    with torch.no_grad():
        out = model(input_ids, abft=LabelSpec(key_class, rows, NUM_CLASSES), output_attentions=True, **kwargs)
    assert rel_err(torch.stack(out.attentions)[:, 0], want_masses) < 1e-5


CHUNK = 4


@pytest.fixture(scope="module")
def llama4():
    eager = hf_families.tiny_model("llama4_text", attention_chunk_size=CHUNK)
    return eager, apply_abft(copy.deepcopy(eager))


def test_chunked_attention_with_cache_matches_eager(llama4):
    """Llama 4's chunked layers in cached decoding: the chunk border falls among the cached keys."""
    eager, abft = llama4
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, eager.config.vocab_size, (2, 3), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[1, 0] = 0  # left padding: chunks start at each row's first real token
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(abft.generate(input_ids, **settings), eager.generate(input_ids, **settings))


def test_chunked_attention_forward(llama4):
    """A forward longer than a chunk: exact without labels, refused with them (naming the chunk size)."""
    eager, abft = llama4
    input_ids, mask, key_class, rows, _ = hf_families.icl_batch(eager.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        got = abft(input_ids, attention_mask=mask).logits
        want = eager(input_ids, attention_mask=mask).logits
    assert rel_err(got[real], want[real]) < 1e-5
    with pytest.raises(ValueError, match=f"attention_chunk_size={CHUNK}"):
        abft(input_ids, attention_mask=mask, abft=LabelSpec(key_class, rows, hf_families.NUM_CLASSES),
             output_attentions=True)
    short = input_ids[:, -CHUNK:]  # one chunk: labels work
    spec = LabelSpec(key_class[:, -CHUNK:], torch.full((3, 1), CHUNK - 1), hf_families.NUM_CLASSES)
    out = abft(short, abft=spec, output_attentions=True)
    assert len(out.attentions) == eager.config.num_hidden_layers
