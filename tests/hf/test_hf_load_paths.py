"""Every way to get attn_implementation="abft" behaves the same, and a model call checks its inputs in one
host sync however many layers the model has."""
from __future__ import annotations

import collections

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import abft_kernels.recipes.models as models  # noqa: E402
from abft_kernels.hf import LabelSpec, apply_abft, trainable_qk  # noqa: E402

import hf_families  # noqa: E402
from test_hf_models import FAMILIES, NUM_CLASSES, TRANSFORMERS_4, icl_batch  # noqa: E402
from test_hf_models import tiny_model as family_model  # noqa: E402

needs_transformers_5 = pytest.mark.skipif(TRANSFORMERS_4, reason="abft on Falcon needs transformers 5")
# family -> regular expression of the ValueError at load time (None: loads), and of the ValueError of a call with
# labels (None: returns one mass per layer).
CASES = {
    "llama": (None, None),
    "gpt2": (None, None),
    "falcon": (None, None),  # rotary Falcon: its attention is patched, on every load path
    # Its decoder layers drop the keywords: the spec rides in the rotary embeddings (patching.py). Transformers 4.57
    # builds its attention from a table of classes with their own attention code: refused at load.
    "stablelm": ("cannot run stablelm: it(s attention| builds its attention layers from ATTENTION_CLASSES)", None)
    if TRANSFORMERS_4 else (None, None),
    "bloom": ("cannot run bloom: its attention \\(BloomAttention\\)", None),  # ALiBi, own attention code
}


def eager_model(family: str):
    if family in FAMILIES:
        return family_model(family)
    return hf_families.tiny_model(family)


def save_with_tokenizer(model, folder) -> str:
    """A tiny model and a word-level tokenizer (built offline) in one folder, as load_model reads them."""
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w1").save_pretrained(
        folder)
    model.save_pretrained(folder)
    return str(folder)


def load(path: str, folder: str, family: str):
    """The model through one load path."""
    if path == "from_pretrained":
        return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="abft")
    if path == "load_model":
        return models.load_model(folder)[0]
    if path == "from_config":
        config = transformers.AutoConfig.from_pretrained(folder)
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="abft")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    if path == "set_attn_implementation":
        model.set_attn_implementation("abft")
        return model
    return apply_abft(model)


PATHS = ["from_pretrained", "load_model", "from_config", "set_attn_implementation", "apply_abft"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}
    for family in CASES:
        if family == "falcon" and TRANSFORMERS_4:
            continue
        folders[family] = save_with_tokenizer(eager_model(family), tmp_path_factory.mktemp(family))
    return folders


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", [f if f != "falcon" else pytest.param(f, marks=needs_transformers_5) for f in CASES])
def test_every_load_path_checks_the_same(saved, family, path):
    load_error, call_error = CASES[family]
    if load_error is not None:
        with pytest.raises(ValueError, match=load_error):
            load(path, saved[family], family)
        return
    model = load(path, saved[family], family).eval()
    assert model.config._attn_implementation == "abft" and model._abft_hooks
    input_ids, mask, key_class, rows, _ = icl_batch()
    input_ids = input_ids % model.config.vocab_size
    spec = LabelSpec(key_class, rows, NUM_CLASSES)
    if call_error is not None:
        with pytest.raises(ValueError, match=call_error):
            model(input_ids, attention_mask=mask, abft=spec, output_attentions=True, use_cache=False)
        return
    out = model(input_ids, attention_mask=mask, abft=spec, output_attentions=True, use_cache=False)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert all(m.shape == (3, model.config.num_attention_heads, 1, NUM_CLASSES) for m in out.attentions)


@pytest.mark.parametrize("family", ["llama", pytest.param("falcon", marks=needs_transformers_5)])
def test_reentrant_checkpointing_refused_through_load_model(saved, family):
    model = models.load_model(saved[family])[0]
    trainable_qk(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    input_ids, mask, key_class, rows, _ = icl_batch()
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids, attention_mask=mask, abft=LabelSpec(key_class, rows, NUM_CLASSES), output_attentions=True,
              use_cache=False)


class HostSyncs:
    """Counts the calls that read a tensor's value on the host (item, tolist, bool, int, float, index)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = collections.Counter()
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name, method):
        def counted(tensor, *args, **kwargs):
            self.count[name] += 1
            return method(tensor, *args, **kwargs)

        return counted

    @property
    def total(self) -> int:
        return sum(self.count.values())


def syncs_of_one_training_step(monkeypatch, layers: int, checkpointing: bool) -> int:
    model = family_model("llama", num_hidden_layers=layers, attn_implementation="abft")
    trainable_qk(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    input_ids, mask, key_class, rows, _ = icl_batch()
    spec = LabelSpec(key_class, rows, NUM_CLASSES)
    with monkeypatch.context() as patch:
        syncs = HostSyncs(patch)
        out = model(input_ids, attention_mask=mask, abft=spec, output_attentions=True, use_cache=False)
        assert len(out.attentions) == layers
        sum(m.sum() for m in out.attentions).backward()  # checkpointing recomputes every layer here
    return syncs.total


@pytest.mark.parametrize("checkpointing", [False, True])
def test_host_syncs_do_not_grow_with_layers(monkeypatch, checkpointing):
    two = syncs_of_one_training_step(monkeypatch, 2, checkpointing)
    four = syncs_of_one_training_step(monkeypatch, 4, checkpointing)
    assert two == four == 1, (two, four)


def test_label_values_checked_once_per_call_and_still_refused():
    model = family_model("llama", attn_implementation="abft")
    input_ids, mask, key_class, rows, _ = icl_batch()
    bad_class = key_class.clone()
    bad_class[0, 3] = NUM_CLASSES
    with pytest.raises(ValueError, match="key_class values"):
        model(input_ids, attention_mask=mask, abft=LabelSpec(bad_class, rows, NUM_CLASSES), output_attentions=True)
    with pytest.raises(ValueError, match="query_rows values"):
        model(input_ids, attention_mask=mask, abft=LabelSpec(key_class, rows + 100, NUM_CLASSES),
              output_attentions=True)
    spec = LabelSpec(key_class, rows, NUM_CLASSES)
    assert not spec.values_checked
    model(input_ids, attention_mask=mask, abft=spec, output_attentions=True)
    assert spec.values_checked
