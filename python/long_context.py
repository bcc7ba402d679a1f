"""ABFT with many demonstrations per prompt (k = 64 by default: thousands of tokens), through the Python API.

The label masses come from label_attention, which never forms an N x N attention matrix, so a step's
memory grows linearly with the prompt length; non-reentrant gradient checkpointing keeps one layer's
activations live at a time. One prompt per forward pass, gradient accumulation up to the step size.

    python python/long_context.py --model meta-llama/Llama-3.1-8B --dataset sst2 --k 64 --lora 16 --bf16
    python python/long_context.py --k 24 --steps 2 --prompts-per-step 2 --eval-prompts 8   # CPU smoke run
"""
import argparse
from dataclasses import asdict

import torch

from abft_kernels.evaluation import evaluate, peak_memory_mb, reset_peak_memory
from abft_kernels.hf import trainable_qk
from abft_kernels.icl import ICLCollator, PromptBuilder, load_task, sample_prompts, training_prompts
from abft_kernels.models import DEFAULT_MODEL, load_model
from abft_kernels.training import ABFTTrainer, abft_training_arguments


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
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Full Q/K training keeps fp32 weights (Adam steps of 2e-5 vanish in bf16); LoRA adapters stay fp32 anyway.
    dtype = torch.bfloat16 if args.bf16 and args.lora else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    task = load_task(args.dataset, test_size=args.eval_prompts)
    builder = PromptBuilder(tokenizer, task.template)
    held_out = sample_prompts(builder, task.train, task.test, args.k, seed=1)
    lengths = sorted(len(p.input_ids) for p in held_out)
    print(f"k = {args.k}: prompts of {lengths[0]} to {lengths[-1]} tokens (median {lengths[len(lengths) // 2]})")

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
    trainer = ABFTTrainer(model=model, args=training_args, train_dataset=prompts,
                          data_collator=ICLCollator(tokenizer.pad_token_id), num_classes=task.template.num_classes,
                          run_info={"base_model": args.model or DEFAULT_MODEL, "lora": args.lora,
                                    "dataset": args.dataset, "template": asdict(task.template), "k": args.k})
    reset_peak_memory(device)
    trainer.train()
    train_peak = peak_memory_mb(device)
    trainer.save_model(args.output_dir)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        after = evaluate(model, held_out, builder.label_token_ids, tokenizer.pad_token_id, batch_size=1)
    print(f"accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}, counted heads {before.mean_counted_heads:.1f} -> "
          f"{after.mean_counted_heads:.1f}, gold-label mass {before.mean_gold_mass:.4f} -> {after.mean_gold_mass:.4f} "
          f"({len(held_out)} held-out prompts); peak memory in training {train_peak:.0f} MiB")


if __name__ == "__main__":
    main()
