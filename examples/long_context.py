"""ABFT with many demonstrations per prompt (k = 64 by default: thousands of tokens), through the Python API.

The label masses come from label_attention, which never forms an N x N attention matrix, so a step's
memory grows linearly with the prompt length; non-reentrant gradient checkpointing keeps one layer's
activations live at a time. One prompt per forward pass, gradient accumulation up to the step size.

    python examples/long_context.py --model meta-llama/Llama-3.1-8B --dataset sst2 --k 64 --lora 16 --bf16
    python examples/long_context.py --k 24 --steps 2 --prompts-per-step 2 --eval-prompts 8   # CPU smoke run
    # the measured CPU run of docs/results.md (built-in SmolLM2-135M, rt-sentiment, prompts of about 4k tokens):
    python examples/long_context.py --k 128 --steps 4 --prompts-per-step 2 --eval-prompts 16 --threads 1

It prints, and writes to <output-dir>/long_context.json, the prompt lengths, what eager attention with
output_attentions (the paper's way of getting the masses) would need at the shortest prompt, accuracy and
attention before and after training, the times and the peak memory.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from abft_kernels.recipes.evaluation import evaluate, peak_memory_mb, reset_peak_memory
from abft_kernels.hf import trainable_qk
from abft_kernels.recipes.icl import ICLCollator, PromptBuilder, load_task, sample_prompts, training_prompts
from abft_kernels.recipes.models import DEFAULT_MODEL, load_model
from abft_kernels.recipes.training import ABFTTrainer, abft_training_arguments


def eager_estimate_gib(model, seq_len: int) -> float:
    """What one training step with eager attention and output_attentions needs at seq_len tokens, in GiB: the
    weights plus two N x N fp32 tensors per (layer, head) (the probabilities every layer returns, kept for the loss,
    and one more of that size in backward). The estimate of benchmarks/model_level.py for fp32; measured eager
    peaks are in benchmarks/results/<cpu>/long_context_final.md."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weights + config.num_hidden_layers * config.num_attention_heads * seq_len ** 2 * 8) / 2 ** 30


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model name or path (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--dataset", default="rt-sentiment")
    parser.add_argument("--k", type=int, default=64, help="demonstrations per prompt")
    parser.add_argument("--lora", type=int, help="LoRA rank on W_Q/W_K (else the projections themselves)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast; with --lora also bf16 base weights")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--output-dir", default="runs/long_context")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Full Q/K training keeps fp32 weights (Adam steps of 2e-5 vanish in bf16); LoRA adapters stay fp32 anyway.
    dtype = torch.bfloat16 if args.bf16 and args.lora else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    task = load_task(args.dataset, test_size=args.eval_prompts)
    builder = PromptBuilder(tokenizer, task.template)
    held_out = sample_prompts(builder, task.train, task.test, args.k, seed=1)
    lengths = sorted(len(p.input_ids) for p in held_out)
    eager_gib = eager_estimate_gib(model, lengths[0])
    print(f"k = {args.k}: prompts of {lengths[0]} to {lengths[-1]} tokens (median {lengths[len(lengths) // 2]}); "
          f"eager attention with output_attentions would need ~{eager_gib:.1f} GiB at {lengths[0]} tokens")

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        before = evaluate(model, held_out, builder.label_token_ids, tokenizer.pad_token_id, batch_size=1)
    trainable_qk(model, lora=args.lora)
    # Non-reentrant, so that the recomputed layers keep the masses' gradients (transformers 5 renamed the method).
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    training_args = abft_training_arguments(
        args.output_dir, learning_rate=args.lr, steps=args.steps, prompts_per_step=args.prompts_per_step,
        micro_batch=1, save_steps=8, bf16=args.bf16, use_cpu=device.type == "cpu")
    prompts = training_prompts(builder, task.train, args.k, args.steps * args.prompts_per_step, seed=2)
    train_lengths = sorted(len(p.input_ids) for p in prompts)
    trainer = ABFTTrainer(model=model, args=training_args, train_dataset=prompts,
                          data_collator=ICLCollator(tokenizer.pad_token_id), num_classes=task.template.num_classes,
                          run_info={"base_model": args.model or DEFAULT_MODEL, "lora": args.lora,
                                    "dataset": args.dataset, "template": asdict(task.template), "k": args.k})
    reset_peak_memory(device)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    train_peak = peak_memory_mb(device)
    trainer.save_model(args.output_dir)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        after = evaluate(model, held_out, builder.label_token_ids, tokenizer.pad_token_id, batch_size=1)
    print(f"accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}, counted heads {before.mean_counted_heads:.1f} -> "
          f"{after.mean_counted_heads:.1f}, gold-label mass {before.mean_gold_mass:.4f} -> {after.mean_gold_mass:.4f} "
          f"({len(held_out)} held-out prompts); peak memory in training {train_peak:.0f} MiB")
    what_peak = "torch.cuda.max_memory_allocated in training" if device.type == "cuda" else \
        "the process's peak resident memory (ru_maxrss: evaluation before, training)"
    report = {
        "command": "python examples/long_context.py " + " ".join(sys.argv[1:]), "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2), "model": args.model or DEFAULT_MODEL,
        "dataset": args.dataset, "k": args.k, "held_out_lengths": lengths, "train_lengths": train_lengths,
        "eager_estimate_gib_at_shortest": eager_gib, "steps": args.steps, "prompts_per_step": args.prompts_per_step,
        "train_seconds": train_seconds, "train_peak_memory_mib": train_peak, "peak_memory_is": what_peak,
        "before": {k: v for k, v in asdict(before).items() if k not in ("gold_mass", "label_mass")},
        "after": {k: v for k, v in asdict(after).items() if k not in ("gold_mass", "label_mass")},
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "long_context.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
