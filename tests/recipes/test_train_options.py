"""Options of `abft train` beyond the method itself (issue 14): the end-to-end fine-tuning baseline
(--objective e2e), the paper's 4-bit regime (--load-in-4bit, refused where bitsandbytes or CUDA is missing) and
data-parallel training under torchrun (the same run as one process). Offline: a tiny tokenizer, a tiny Llama and a
generated CSV task."""
import copy
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from abft_kernels.recipes.cli import main
from abft_kernels.recipes.icl import ICLCollator, PromptBuilder, Template, load_task, training_prompts
from abft_kernels.recipes.training import CONFIG_FILE, WEIGHTS_FILE
from tiny_icl import tiny_tokenizer

SENTIMENT = Template("review: ", "sentiment:", ("negative", "positive"))
TASK_OPTIONS = ["--label-words", "negative,positive", "--input-prefix", "review: ", "--label-prefix", "sentiment:",
                "--eval-prompts", "8", "--k", "2", "--threads", "1"]
REPO = Path(__file__).resolve().parents[2]


def counting_llama(vocab_size: int):
    """A tiny random Llama (2 layers, 4 query / 2 key-value heads) whose attention is peaked enough (weights of
    std 0.5) that some heads pass the induction filter on some prompts, so that the counted heads and A move."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.5)
    return LlamaForCausalLM(config).eval()


def write_task(path: Path, rows: int = 60) -> Path:
    """A two-class CSV task in the tiny tokenizer's words (class = the sentiment words' polarity), texts of 3 to 6
    words."""
    rng = random.Random(0)
    fillers = ["movie", "film", "plot", "the", "a", "is", "was", "very", "not"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = i % 2
            words = rng.sample(fillers, rng.randint(1, 4)) + [("bad", "good")[label], ("dull", "great")[label]]
            writer.writerow([" ".join(words), label])  # prompts of different lengths: padded batches
    return path


@pytest.fixture
def tiny_run_inputs(tmp_path):
    """(model folder with its tokenizer, CSV task) in tmp_path."""
    tokenizer = tiny_tokenizer()
    counting_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model", write_task(tmp_path / "task.csv")


def test_e2e_step_trains_lora_on_query_key_with_the_read_out_cross_entropy(tmp_path):
    """One step of --objective e2e: its loss is the cross-entropy of the label words' logits at the query token
    (computed here by hand with the eager attention), and only the LoRA adapters of W_Q/W_K move."""
    from dataclasses import replace

    from abft_kernels.hf import trainable_qk
    from abft_kernels.recipes.settings import E2E_LORA_RANK, PAPER
    from abft_kernels.recipes.training import ABFTTrainer, abft_training_arguments

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = counting_llama(len(tokenizer))
    reference = copy.deepcopy(model)  # eager attention, untouched
    model.set_attn_implementation("abft")
    task = load_task(str(write_task(tmp_path / "task.csv")), template=SENTIMENT, test_size=8)
    builder = PromptBuilder(tokenizer, SENTIMENT, style="staicc")
    prompts = training_prompts(builder, task.train, k=2, num_prompts=4, seed=0)

    with torch.no_grad():  # by hand: each prompt alone, no padding, the last token's logits of the label words
        logits = torch.stack([reference(torch.tensor([p.input_ids])).logits[0, -1, builder.label_token_ids]
                              for p in prompts])
    expected = -logits.log_softmax(-1)[torch.arange(4), torch.tensor([p.gold for p in prompts])].mean()

    trainable_qk(model, lora=E2E_LORA_RANK)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = abft_training_arguments(str(tmp_path / "run"), learning_rate=1e-2, steps=1, prompts_per_step=4,
                                   micro_batch=4, save_steps=0, disable_tqdm=True, use_cpu=True)
    trainer = ABFTTrainer(model=model, args=args, train_dataset=prompts,
                          data_collator=ICLCollator(tokenizer.pad_token_id), num_classes=2,
                          settings=replace(PAPER, objective="e2e"), label_token_ids=builder.label_token_ids)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["e2e_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert log["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert "A" not in log and log["counted_heads"] >= 0 and log["gold_mass"] > 0  # logged, no controller
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".lora_" in n and ("q_proj" in n or "k_proj" in n) for n in changed), sorted(changed)
    with pytest.raises(ValueError, match="label_token_ids"):
        ABFTTrainer(model=model, args=args, train_dataset=prompts, num_classes=2,
                    settings=replace(PAPER, objective="e2e"))


def test_train_objective_e2e_command(tiny_run_inputs, tmp_path):
    """`abft train --objective e2e`: LoRA of the paper's rank unless --lora is given, its log has the
    cross-entropy and no A, and `abft eval --weights` applies the adapters."""
    from abft_kernels.recipes.settings import E2E_LORA_RANK

    model, task = tiny_run_inputs
    main(["train", "--model", str(model), "--dataset", str(task), *TASK_OPTIONS, "--objective", "e2e",
          "--steps", "2", "--prompts-per-step", "2", "--micro-batch", "2", "--train-prompts", "4", "--lr", "1e-2",
          "--save-steps", "0", "--output-dir", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert saved["settings"]["lora"] == E2E_LORA_RANK and saved["lora_config"]["r"] == E2E_LORA_RANK
    assert saved["settings"]["objective"] == "e2e" and saved["controller"] is None
    assert all(".lora_" in name for name in load_file(str(tmp_path / "run" / WEIGHTS_FILE)))
    steps = [h for h in json.loads((tmp_path / "run" / "report.json").read_text())["training_log"]
             if "e2e_loss" in h]
    assert len(steps) == 2 and not any("A" in h or "abft_loss" in h for h in steps)
    assert (tmp_path / "run" / "dynamics.png").is_file()
    main(["eval", "--weights", str(tmp_path / "run"), "--output-dir", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["after"]["num_prompts"] == 8


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
                    reason="bitsandbytes and a GPU are here: 4-bit loading would run, not be refused")
def test_load_in_4bit_is_refused_before_loading_without_lora_bitsandbytes_or_cuda(tmp_path, monkeypatch):
    """--load-in-4bit needs --lora, bitsandbytes and a CUDA GPU; each missing one is a ValueError that names the
    option, raised before any model is loaded (the model folder does not even exist)."""
    import abft_kernels.recipes.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(models, "resolve_model", no_loading)
    absent = ["--model", str(tmp_path / "absent"), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="--load-in-4bit needs --lora"):
        main(["train", "--load-in-4bit", *absent])
    with pytest.raises(ValueError, match="--load-in-4bit needs (the bitsandbytes package|a CUDA GPU)"):
        main(["train", "--load-in-4bit", "--lora", "16", *absent])
    with pytest.raises(ValueError, match="--load-in-4bit needs (the bitsandbytes package|a CUDA GPU)"):
        main(["train", "--load-in-4bit", "--objective", "e2e", *absent])  # e2e brings its LoRA rank
    with pytest.raises(ValueError, match="--load-in-4bit needs (the bitsandbytes package|a CUDA GPU)"):
        main(["eval", "--load-in-4bit", *absent])


@pytest.mark.parametrize("objective", ["abft", "e2e"])
def test_torchrun_two_processes_equal_one_process(tiny_run_inputs, tmp_path, objective):
    """`abft train` under `torchrun --nproc-per-node 2` (CPU, gloo) against one process with the same global batch
    (8 prompts per step, 2 per forward pass): the same per-step log (counted heads, loss, A) and the same weights.
    abft trains W_Q/W_K themselves; e2e trains LoRA adapters (seeded, so both runs start from the same ones)."""
    model, task = tiny_run_inputs
    options = ["train", "--model", str(model), "--dataset", str(task), *TASK_OPTIONS, "--objective", objective,
               "--steps", "6", "--prompts-per-step", "8", "--micro-batch", "2", "--train-prompts", "48",
               "--lr", "1e-2", "--save-steps", "0", "--no-resume"]
    main([*options, "--output-dir", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "abft_kernels.recipes.cli", *options, "--output-dir", str(tmp_path / "two")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    keys = ["counted_heads", "gold_mass"] + (["abft_loss", "A", "next_A"] if objective == "abft" else ["e2e_loss"])
    logs = [[[h[key] for key in keys] for h in json.loads((tmp_path / run / "report.json").read_text())[
        "training_log"] if "counted_heads" in h] for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 6
    assert torch.allclose(torch.tensor(logs[1]), torch.tensor(logs[0]), rtol=1e-5, atol=1e-7), logs
    if objective == "abft":
        assert len({step[keys.index("next_A")] for step in logs[0]}) > 1, "A never moved: nothing to compare"
    one, two = (load_file(str(tmp_path / run / WEIGHTS_FILE)) for run in ("one", "two"))
    base = load_file(str(model / "model.safetensors"))
    assert sorted(one) == sorted(two)
    for name in one:
        # Adam divides each element's gradient by its own running RMS, so an element whose gradient is mostly
        # rounding (summed in another order over two processes) moves by a different fraction of lr: 1e-4 is 1% of
        # one step of lr 1e-2 (measured: at most 7e-7 on this data; 2.3e-5 on e2e's adapters with other texts).
        assert torch.allclose(two[name], one[name], rtol=0, atol=1e-4), name
        if name in base:
            assert not torch.equal(one[name], base[name]), f"{name} did not train"


def test_end_process_group_frees_ddp_before_the_group(tmp_path, monkeypatch):
    """`end_process_group` drops every reference to the trainer's DDP wrapper (its reducer must not be the one that
    frees the gloo group: it keeps the GIL while the group joins its threads, pytorch/pytorch#190489), then
    destroys the process group; in a single process it does nothing. A one-process gloo group and a real DDP."""
    import types
    import weakref

    import torch.distributed as dist
    from accelerate import Accelerator

    from abft_kernels.recipes.training import end_process_group

    model = torch.nn.Linear(3, 2)
    trainer = types.SimpleNamespace(model=model, model_wrapped=model, accelerator=Accelerator(cpu=True))
    end_process_group(trainer)  # not distributed: nothing to do
    assert trainer.model_wrapped is model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp(torch.randn(4, 3)).sum().backward()  # a collective, like training's last step
        trainer.model_wrapped = ddp
        trainer.accelerator._models.append(ddp)  # where Accelerator.prepare keeps it
        wrapper = weakref.ref(ddp)
        del ddp
        alive_at_destroy = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group",
                            lambda *args: (alive_at_destroy.append(wrapper() is not None), destroy(*args)))
        end_process_group(trainer)
        assert alive_at_destroy == [False], "the DDP wrapper was still alive when the group was destroyed"
        assert not dist.is_initialized()
        assert trainer.model_wrapped is model
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_gold_demonstration_reaches_the_training_prompts(tiny_run_inputs, tmp_path, monkeypatch):
    """`abft train --gold-demonstration` builds its training prompts with gold_demonstration=True (every prompt
    holds a demonstration of its query's class) and records the setting in abft_config.json."""
    import abft_kernels.recipes.workflow as workflow

    model, task = tiny_run_inputs
    built = []

    def recording(*args, **kwargs):
        prompts = training_prompts(*args, **kwargs)
        built.append((kwargs.get("gold_demonstration"), prompts))
        return prompts

    monkeypatch.setattr(workflow, "training_prompts", recording)
    main(["train", "--model", str(model), "--dataset", str(task), *TASK_OPTIONS, "--gold-demonstration",
          "--steps", "1", "--prompts-per-step", "4", "--micro-batch", "4", "--train-prompts", "16",
          "--save-steps", "0", "--no-resume", "--output-dir", str(tmp_path / "run")])
    (gold, prompts), = built
    assert gold is True and all(p.gold in p.label_classes for p in prompts)
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["settings"]["gold_demonstration"] is True
