"""Save and reload an ABFT run both ways people do it (issue 22, item 3): `apply_trained_weights` onto a fresh base
model, and export to what loads without this package (a plain transformers folder, LoRA merged; a PEFT adapter
folder). Runs set up through the Python API (`trainable_qk(model, lora=...)`, `ABFTTrainer.train()`,
`save_model`), on a tiny Llama (separate q_proj/k_proj), GPT-2 (fused Conv1D c_attn) and GPT-NeoX (fused, per-head
interleaved query_key_value), full query/key and LoRA. Every round trip is checked by the logits."""
import copy
import csv
import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from abft_kernels.export import export_peft_adapter, export_pretrained
from abft_kernels.hf import trainable_qk
from abft_kernels.recipes.icl import ICLCollator, PromptBuilder, Template, load_task, training_prompts
from abft_kernels.recipes.training import CONFIG_FILE, ABFTTrainer, abft_training_arguments, apply_trained_weights
from tiny_icl import tiny_tokenizer

SENTIMENT = Template("review: ", "sentiment:", ("negative", "positive"))
IDS = torch.tensor([[3, 7, 12, 9, 2, 30, 17, 5, 40, 11, 8]])


def tiny_model(family: str, vocab_size: int):
    """A 2-layer random causal LM of `family` in float32 with eager attention, its weights of std 0.5 so that
    attention is peaked and the trained tensors matter."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(0)
    config = {
        "llama": lambda: LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        "gpt2": lambda: GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0),
        "gpt_neox": lambda: GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                          bos_token_id=0, eos_token_id=0),
    }[family]()
    config.initializer_range = 0.5
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def write_task(path):
    rng = random.Random(0)
    fillers = ["movie", "film", "plot", "the", "a", "is", "was", "very", "not"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(40):
            words = rng.sample(fillers, rng.randint(1, 3)) + [("bad", "good")[i % 2], ("dull", "great")[i % 2]]
            writer.writerow([" ".join(words), i % 2])
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def python_api_run(tmp_path, family: str, lora):
    """The base model folder (with the tokenizer) and the trained model of one ABFTTrainer step through the Python
    API (no run_info), its trained tensors then moved by noise (stand-in for a longer run), saved to tmp/run."""
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    tiny_model(family, len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = load(tmp_path / "base")
    model.set_attn_implementation("abft")
    trainable_qk(model, lora=lora)
    task = load_task(str(write_task(tmp_path / "task.csv")), template=SENTIMENT, test_size=8)
    prompts = training_prompts(PromptBuilder(tokenizer, SENTIMENT), task.train, k=2, num_prompts=2, seed=0)
    args = abft_training_arguments(str(tmp_path / "run"), learning_rate=1e-3, steps=1, prompts_per_step=2,
                                   micro_batch=2, save_steps=0, disable_tqdm=True, use_cpu=True)
    trainer = ABFTTrainer(model=model, args=args, train_dataset=prompts, num_classes=2,
                          data_collator=ICLCollator(tokenizer.pad_token_id))
    trainer.train()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    trainer.save_model(str(tmp_path / "run"))
    model.set_attn_implementation("eager")
    return tmp_path / "base", model.eval()


# Loads the exported folders in a process that never imports abft_kernels.
OUTSIDE = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    plain, base, adapter, ids, out = sys.argv[1:]
    torch.set_num_threads(1)  # as the test process: CPU matmuls may sum in another order on another thread count
    ids = torch.tensor(eval(ids))
    load = lambda folder: AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    result = {}
    with torch.no_grad():
        result["plain"] = load(plain)(ids).logits
        if adapter != "-":
            from peft import PeftModel
            result["peft"] = PeftModel.from_pretrained(load(base), adapter).eval()(ids).logits
    assert "abft_kernels" not in sys.modules
    torch.save(result, out)
""")


def load_outside(tmp_path, plain, base, adapter=None):
    out = tmp_path / "outside.pt"
    subprocess.run([sys.executable, "-c", OUTSIDE, str(plain), str(base), str(adapter or "-"), str(IDS.tolist()),
                    str(out)], check=True, timeout=600)
    return torch.load(out)


def relative_error(x, reference):
    return float((x.double() - reference.double()).norm() / reference.double().norm())


RUNS = [("llama", None), ("llama", 4), ("gpt2", None), ("gpt2", 4), ("gpt_neox", None), ("gpt_neox", 4)]


@pytest.mark.parametrize("family, lora", RUNS)
def test_python_api_run_reloads_and_exports_exactly(tmp_path, family, lora):
    base, trained = python_api_run(tmp_path, family, lora)
    expected = logits(trained)
    assert not torch.equal(expected, logits(load(base)))  # the run changed the model

    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert config["base_model"] == str(base)
    if lora:  # the adapter as peft built it, not an argument
        assert config["lora_config"]["r"] == lora and config["lora_config"]["lora_alpha"] == 8
    else:
        assert config["lora_config"] is None

    fresh = load(base)
    apply_trained_weights(fresh, tmp_path / "run")
    assert torch.equal(logits(fresh), expected)

    if lora:
        truth = logits(copy.deepcopy(trained).double())  # the trained model's function in float64
        export_peft_adapter(trained, tmp_path / "adapter")
        assert torch.equal(logits(trained), expected)  # the adapter export leaves the model as it was
    export_pretrained(trained, tmp_path / "plain", tokenizer=tiny_tokenizer())
    assert not any(".lora_" in n or "parametrizations" in n for n in trained.state_dict())
    outside = load_outside(tmp_path, tmp_path / "plain", base, tmp_path / "adapter" if lora else None)
    if lora:
        assert torch.equal(outside["peft"], expected)
        # Merged, W + scaling * B A rounds to float32 once more than the unmerged sum: the export is as close to the
        # float64 function as the trained model itself is (0.4e-6 to 1.9e-6 relative on these peaked tiny models,
        # float32 rounding, depending on the installed torch and peft).
        own = relative_error(expected, truth)
        assert own < 1e-5 and relative_error(outside["plain"], truth) < 2 * own
    else:
        assert torch.equal(outside["plain"], expected)


def test_lora_config_of_the_run_is_what_reloads(tmp_path):
    """A peft LoraConfig with its own alpha and rsLoRA scaling: apply_trained_weights rebuilds it from the
    config recorded from the model, so the reload is exact (a rank alone would scale the adapters wrongly)."""
    from peft import LoraConfig

    base, trained = python_api_run(tmp_path, "llama", LoraConfig(r=2, lora_alpha=16, use_rslora=True))
    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["lora_config"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 16, True)
    assert sorted(config["target_modules"]) == [f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                for p in ("k_proj", "q_proj")]
    fresh = load(base)
    apply_trained_weights(fresh, tmp_path / "run")
    assert torch.equal(logits(fresh), logits(trained))


def test_second_apply_on_a_split_gpt2_is_a_no_op(tmp_path):
    """GPT-2's c_attn, once split (its class becomes ParametrizedConv1D), is still found as a projection: a second
    apply_trained_weights (or trainable_qk) gives what the first gave; LoRA on top of either is refused."""
    base, trained = python_api_run(tmp_path, "gpt2", None)
    fresh = load(base)
    apply_trained_weights(fresh, tmp_path / "run")
    apply_trained_weights(fresh, tmp_path / "run")
    assert torch.equal(logits(fresh), logits(trained))
    trained_params = trainable_qk(fresh)
    assert len(trained_params) == 2 * 2  # c_attn weight and bias of 2 layers, as the first call found
    assert torch.equal(logits(fresh), logits(trained))
    with pytest.raises(ValueError, match="split for full query/key training"):
        trainable_qk(fresh, lora=4)
    with_lora = load(base)
    trainable_qk(with_lora, lora=4)
    for lora in (4, None):
        with pytest.raises(ValueError, match="already carries peft adapters"):
            trainable_qk(with_lora, lora=lora)


def test_apply_refuses_a_run_of_another_split(tmp_path):
    """A run whose recorded split is not what trainable_qk finds on the model (another base model or layout)."""
    base, _ = python_api_run(tmp_path, "gpt_neox", None)
    path = tmp_path / "run" / CONFIG_FILE
    config = json.loads(path.read_text())
    name = sorted(config["split"])[0]
    config["split"][name] = [[0, 1]]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="other query/key features"):
        apply_trained_weights(load(base), tmp_path / "run")


def test_export_command(tmp_path):
    """`abft export --weights RUN --output-dir DIR --adapter-dir DIR` on a LoRA run of the Python API."""
    from abft_kernels.recipes.cli import main

    base, trained = python_api_run(tmp_path, "gpt2", 4)
    main(["export", "--weights", str(tmp_path / "run"), "--output-dir", str(tmp_path / "plain"),
          "--adapter-dir", str(tmp_path / "adapter")])
    outside = load_outside(tmp_path, tmp_path / "plain", base, tmp_path / "adapter")
    expected, truth = logits(trained), logits(copy.deepcopy(trained).double())
    assert torch.equal(outside["peft"], expected)
    own = relative_error(expected, truth)
    assert own < 1e-5 and relative_error(outside["plain"], truth) < 2 * own
    assert (tmp_path / "plain" / "tokenizer.json").is_file()


def test_export_refusals(tmp_path):
    base, trained = python_api_run(tmp_path, "llama", None)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_peft_adapter(trained, tmp_path / "adapter")
    from abft_kernels.recipes.cli import main

    with pytest.raises(ValueError, match="without LoRA adapters"):
        main(["export", "--weights", str(tmp_path / "run"), "--output-dir", str(tmp_path / "plain"),
              "--adapter-dir", str(tmp_path / "adapter")])
