"""ABFT in a researcher's own transformers loop: LoRA on W_Q/W_K, bf16 autocast, evaluation with ICL accuracy
inside Trainer, the best checkpoint reloaded, then the run reloaded on a fresh model and exported to a plain
transformers folder and a PEFT adapter folder.

    python examples/train_with_transformers.py --output-dir runs/example        # ~3 min on 2 CPU cores

Runs offline on the built-in SmolLM2-135M and rt-sentiment task (README's demo install). Prints the eval log
and checks that every reloaded or exported model gives the trained model's logits.
"""
import argparse
import subprocess
import sys

import torch
import transformers

from abft_kernels.export import export_peft_adapter, export_pretrained
from abft_kernels.hf import trainable_qk
from abft_kernels.recipes.icl import ICLCollator, PromptBuilder, load_task, sample_prompts, training_prompts
from abft_kernels.recipes.models import load_model
from abft_kernels.recipes.training import ABFTTrainer, abft_training_arguments, apply_trained_weights, icl_accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/example")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.output_dir

    transformers.set_seed(0)  # LoRA's initialisation too
    model, tokenizer = load_model()  # attn_implementation="abft", float32 weights
    task = load_task("rt-sentiment", test_size=32, max_chars=100)
    builder = PromptBuilder(tokenizer, task.template)
    train = training_prompts(builder, task.train, k=4, num_prompts=32, seed=44)
    held_out = sample_prompts(builder, task.train, task.test, k=4, seed=43)

    trainable_qk(model, lora=8)  # LoRA adapters on the query/key projections; trainable_qk(model): full W_Q/W_K
    training_args = abft_training_arguments(
        f"{out}/run", learning_rate=5e-4, steps=4, prompts_per_step=8, micro_batch=4, save_steps=2,
        bf16=True, use_cpu=not torch.cuda.is_available(),  # autocast to bf16, as on a GPU
        eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="accuracy")
    trainer = ABFTTrainer(model=model, args=training_args, num_classes=len(task.template.label_words),
                          train_dataset=train, eval_dataset=held_out, data_collator=ICLCollator(tokenizer.pad_token_id),
                          compute_metrics=icl_accuracy, label_token_ids=builder.label_token_ids)
    trainer.train()
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            print({k: round(v, 4) for k, v in entry.items() if k.startswith("eval_") and "runtime" not in k
                   and "per_second" not in k})
    trainer.save_model(f"{out}/run")  # abft_weights.safetensors + abft_config.json (LoRA config, split, settings)

    batch = ICLCollator(tokenizer.pad_token_id)(held_out[:4])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # Trainer(bf16=True) leaves model.forward wrapped in autocast (accelerate); compare in float32 without it.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        want = model(**inputs).logits

    fresh, _ = load_model()
    apply_trained_weights(fresh, f"{out}/run")  # the same LoRA adapters, the saved tensors
    with torch.no_grad():
        got = fresh(**inputs).logits
    assert torch.equal(got, want), "the reloaded run differs from the trained model"
    export_peft_adapter(fresh, f"{out}/adapter")  # PeftModel.from_pretrained(base, f"{out}/adapter")
    export_pretrained(fresh, f"{out}/plain", tokenizer)  # LoRA merged: AutoModelForCausalLM.from_pretrained
    torch.save(inputs, f"{out}/inputs.pt")
    torch.save(want, f"{out}/want.pt")
    # The exported folder loads without this package (a fresh interpreter that never imports abft_kernels).
    check = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{out}/plain").eval()
inputs, want = torch.load("{out}/inputs.pt"), torch.load("{out}/want.pt")
with torch.no_grad():
    got = model(**inputs).logits
real = inputs["attention_mask"].bool()
err = ((got - want)[real].norm() / want[real].norm()).item()
assert "abft_kernels" not in sys.modules and err < 1e-5, err
print(f"plain transformers folder: logits within {{err:.1e}} of the trained model (LoRA merged)")
"""
    subprocess.run([sys.executable, "-c", check], check=True)
    print(f"reloaded exactly; exported to {out}/plain and {out}/adapter")


if __name__ == "__main__":
    main()
