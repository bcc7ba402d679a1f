"""ABFT training through transformers' Trainer on the real SmolLM2 weights."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from abft_fixtures import needs_builtin, truncated_model
from abft_kernels.recipes.icl import ICLCollator, PromptBuilder, load_task, training_prompts
from abft_kernels.recipes.training import (CONFIG_FILE, WEIGHTS_FILE, ABFTTrainer, abft_training_arguments,
                                   apply_trained_weights)

pytestmark = needs_builtin
QK = ("q_proj", "k_proj")


@pytest.fixture(scope="module")
def task():
    return load_task("rt-sentiment", test_size=8, max_chars=100)


def make_trainer(model, tokenizer, task, output_dir, steps, callbacks=(), save_steps=0, lora=None):
    from abft_kernels.hf import trainable_qk

    trainable_qk(model, lora=lora)
    builder = PromptBuilder(tokenizer, task.template)
    prompts = training_prompts(builder, task.train, k=4, num_prompts=2 * steps, seed=0)
    args = abft_training_arguments(str(output_dir), learning_rate=1e-3, steps=steps, prompts_per_step=2,
                                   micro_batch=1, save_steps=save_steps, disable_tqdm=True, use_cpu=True)
    return ABFTTrainer(model=model, args=args, train_dataset=prompts, data_collator=ICLCollator(tokenizer.pad_token_id),
                       num_classes=2, callbacks=list(callbacks), run_info={"base_model": "test", "lora": lora})


def test_one_step_changes_only_query_and_key_weights(task, tmp_path):
    from abft_kernels.recipes.models import load_model

    model, tokenizer = load_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(model, tokenizer, task, tmp_path, steps=1)
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed, "the step changed nothing"
    assert all(name.split(".")[-2] in QK for name in changed), sorted(changed)[:5]
    assert any(".q_proj." in n for n in changed) and any(".k_proj." in n for n in changed)
    # Q/K of layers with counted heads move; the trainer logged the controller's view of the step.
    log = trainer.state.log_history[0]
    assert log["counted_heads"] > 0 and log["A"] == 0.5 and log["abft_loss"] == pytest.approx(log["loss"], rel=1e-3)


class Interrupted(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    """Kills the run right after the checkpoint of `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


def test_resume_after_interrupt_restores_state_exactly(task, tmp_path):
    layers = 18  # SmolLM2's first heads that attend to the labels enough to be counted are in layer 17
    model, tokenizer = truncated_model(layers)
    straight = make_trainer(model, tokenizer, task, tmp_path / "straight", steps=3)
    straight.train()

    model, _ = truncated_model(layers)
    interrupted = make_trainer(model, tokenizer, task, tmp_path / "run", steps=3, save_steps=2,
                               callbacks=[InterruptAfterSave(2)])
    with pytest.raises(Interrupted):
        interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".json")) == \
        [CONFIG_FILE, WEIGHTS_FILE, "trainer_state.json"]  # only the trained tensors, not the model

    model, _ = truncated_model(layers)
    resumed = make_trainer(model, tokenizer, task, tmp_path / "run", steps=3, save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.controller.pid.state_dict() == straight.controller.pid.state_dict()
    assert resumed.controller.pid.history[0] > 0  # heads were counted, so the steps had gradients
    for ours, theirs in zip(resumed.model.named_parameters(), straight.model.named_parameters()):
        assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1]), ours[0]
    steps = lambda trainer: [(h["step"], h["loss"], h["A"]) for h in trainer.state.log_history if "loss" in h]
    assert steps(resumed)[-1] == steps(straight)[-1]


@pytest.mark.parametrize("lora", [None, 4])
def test_saved_weights_apply_to_a_fresh_base_model(task, tmp_path, lora):
    model, tokenizer = truncated_model(num_layers=2)
    trainer = make_trainer(model, tokenizer, task, tmp_path, steps=1, lora=lora)
    with torch.no_grad():  # stand-in for trained values
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    trainer.save_model(str(tmp_path))
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    assert sorted(tensors) == sorted(trainer.trained_names)
    assert len(tensors) == 2 * 2 * (1 if lora is None else 2)  # q/k of 2 layers (LoRA: their A and B)
    assert all((".lora_" in n) == bool(lora) and (".q_proj." in n or ".k_proj." in n) for n in tensors)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["base_model"] == "test" and config["lora"] == lora and config["settings"]["A0"] == 0.5

    fresh, _ = truncated_model(num_layers=2)
    apply_trained_weights(fresh, tmp_path)
    state, trained = fresh.state_dict(), model.state_dict()
    assert sorted(state) == sorted(trained)
    for name in tensors:
        assert torch.equal(state[name], trained[name]), name
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_train_and_eval_commands_on_another_architecture(tmp_path):
    """A user's own model: a tiny random GPT-2 (fused c_attn, attention dropout in its config) on disk."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from abft_kernels.recipes.cli import main
    from abft_kernels.recipes.models import convert_default_model

    tokenizer = AutoTokenizer.from_pretrained(convert_default_model())
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.1,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    run = ["--model", str(tmp_path / "gpt2"), "--eval-prompts", "4", "--max-chars", "100", "--output-dir"]
    main(["train", *run, str(tmp_path / "run"), "--steps", "1", "--prompts-per-step", "2", "--micro-batch", "2",
          "--train-prompts", "2", "--lr", "1e-3"])
    assert sorted(load_file(str(tmp_path / "run" / WEIGHTS_FILE))) == [
        f"transformer.h.{i}.attn.c_attn.parametrizations.{p}.original" for i in range(2) for p in ("bias", "weight")]
    main(["eval", "--weights", str(tmp_path / "run"), "--output-dir", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["after"]["num_prompts"] == 4 and len(report["after"]["gold_mass"]) == 2


@pytest.mark.parametrize("ablation, flags", [
    ("no PID (A fixed)", ["--controller", "fixed", "--A0", "0.3"]),
    ("A = 0", ["--controller", "fixed", "--A0", "0"]),
    ("B = 0", ["--B", "0"]),
    ("every head counted", ["--count-all-heads"]),
])
def test_train_ablations(tmp_path, ablation, flags):
    """`abft train` with each ablation of the paper's method (issue 14): a tiny random GPT-2, two steps."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from abft_kernels.recipes.cli import main
    from abft_kernels.recipes.models import convert_default_model

    tokenizer = AutoTokenizer.from_pretrained(convert_default_model())
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    main(["train", "--model", str(tmp_path / "gpt2"), "--eval-prompts", "4", "--max-chars", "100", "--steps", "3",
          "--prompts-per-step", "2", "--micro-batch", "2", "--train-prompts", "6", "--lr", "1e-2", "--save-steps", "0",
          "--output-dir", str(tmp_path / "run"), *flags])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    saved = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["settings"]
    steps = [h for h in report["training_log"] if "abft_loss" in h]
    assert len(steps) == 3 and (tmp_path / "run" / "dynamics.png").is_file()
    if "--controller" in flags:
        A0 = float(flags[flags.index("--A0") + 1])
        assert saved["controller"] == "fixed" and [h["A"] for h in steps] == [A0] * 3
    if "--B" in flags:
        assert saved["B"] == 0.0
    if "--count-all-heads" in flags:
        # a random model's heads rarely pass S > T, but every head is in the loss: it is never 0
        assert saved["count_all_heads"] and all(h["abft_loss"] > 0 for h in steps)


def test_bf16_training_arguments_run_on_a_machine_without_a_gpu(tmp_path, monkeypatch):
    """abft_training_arguments(bf16=True) as README's Trainer example writes it: without a CUDA or MPS device it sets
    use_cpu (transformers refuses CPU bf16 otherwise); a given use_cpu is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert abft_training_arguments(str(tmp_path), bf16=True).use_cpu
    assert not abft_training_arguments(str(tmp_path)).use_cpu  # fp32: nothing to decide
    with pytest.raises(ValueError, match="use_cpu"):  # what transformers says when told not to use the CPU
        abft_training_arguments(str(tmp_path), bf16=True, use_cpu=False)
