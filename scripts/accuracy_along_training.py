"""Held-out ICL accuracy along training: `abft demo`'s split, prompts and Trainer (workflow.train_on_task) with an
evaluation of the held-out prompts every --every optimiser steps, one JSON line per evaluation.

    python scripts/accuracy_along_training.py --seed 42 --steps 32 --out results/demo/curve-seed42.json

Each evaluation is the demo's `eval before/after` (same prompts, same read-out); it uses no random numbers, so the
training itself is the demo's run with --steps given. The rows' train_heads / A are the training log's last values
(the step before the evaluation).
"""
import argparse
import json
from dataclasses import replace

import torch
from transformers import TrainerCallback

from abft_kernels.recipes import workflow
from abft_kernels.recipes.models import load_model
from abft_kernels.recipes.settings import DEMO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEMO.seed)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--every", type=int, default=4, help="evaluate every this many steps")
    parser.add_argument("--eval-prompts", type=int, default=DEMO.eval_prompts)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSON file of the rows (rewritten after each evaluation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = replace(DEMO, seed=args.seed, steps=args.steps, eval_prompts=args.eval_prompts)
    model, tokenizer = load_model(settings.model, device="cpu")
    task = workflow.load_workflow_task(settings, workflow.task_template(settings))
    evaluate = workflow.held_out_evaluation(tokenizer, task, settings)
    rows = []

    def record(step: int, log: dict) -> None:
        result = evaluate(model, progress=False)
        rows.append({"step": step, "accuracy": result.accuracy, "counted_heads": result.mean_counted_heads,
                     "gold_mass": result.mean_gold_mass,
                     "share_predicted_class_1": sum(result.predictions) / len(result.predictions),
                     "train_heads": log.get("counted_heads"), "A": log.get("A")})
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)

    class EvaluateEvery(TrainerCallback):
        def on_step_end(self, _, state, control, **kwargs):
            if state.global_step % args.every == 0:
                record(state.global_step, state.log_history[-1] if state.log_history else {})

    record(0, {})
    workflow.train_on_task(model, tokenizer, task, settings, args.out + ".run", callbacks=[EvaluateEvery()])


if __name__ == "__main__":
    main()
