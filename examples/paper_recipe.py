"""The paper's recipe (ABFT, arXiv 2505.14233, section 5) on a hub model and its eight datasets.

For each dataset: `abft train` with the paper's settings (k = 4, 512 training prompts, Adam lr 2e-5,
32 prompts per step, 32 steps, A0 = 0.5, B = 1.0, PID-steered A), then `abft eval` of ICL accuracy
before and after on held-out prompts (512 by default). Needs the Hugging Face hub (model and datasets)
and, for 7B-class models, a GPU. Rerunning resumes interrupted trainings and skips finished ones.
Options after `--` go to `abft train` (e.g. -- --bf16 --micro-batch 4 --lora 16).

    python examples/paper_recipe.py --model openai-community/gpt2-large
    python examples/paper_recipe.py --model meta-llama/Meta-Llama-3-8B -- --bf16 --micro-batch 4
"""
import argparse
import json
from pathlib import Path

from abft_kernels.recipes.cli import main as abft
from abft_kernels.recipes.icl import PAPER_TASKS


def run(model: str, datasets, output_root: Path, eval_prompts: int, train_options) -> None:
    rows = []
    for dataset in datasets:
        folder = output_root / dataset
        if not (folder / "abft_weights.safetensors").is_file():
            abft(["train", "--model", model, "--dataset", dataset, "--output-dir", str(folder), *train_options])
        abft(["eval", "--weights", str(folder), "--eval-prompts", str(eval_prompts),
              "--output-dir", str(folder / "eval")])
        report = json.loads((folder / "eval" / "report.json").read_text())
        rows.append((dataset, report["before"]["accuracy"], report["after"]["accuracy"]))
    print(f"\n{model}: ICL accuracy (k = 4, {eval_prompts} held-out prompts per dataset)")
    print(f"{'dataset':14}{'before':>10}{'after':>10}")
    for dataset, before, after in rows:
        print(f"{dataset:14}{before:>10.3f}{after:>10.3f}")
    average = lambda column: sum(row[column] for row in rows) / len(rows)
    print(f"{'average':14}{average(1):>10.3f}{average(2):>10.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model name or path")
    parser.add_argument("--datasets", default=",".join(PAPER_TASKS), help="comma-separated, default: all eight")
    parser.add_argument("--output-root", default="runs/paper")
    parser.add_argument("--eval-prompts", type=int, default=512)
    parser.add_argument("train_options", nargs=argparse.REMAINDER, help="after --: options of abft train")
    args = parser.parse_args()
    train_options = args.train_options[1:] if args.train_options[:1] == ["--"] else args.train_options
    run(args.model, args.datasets.split(","), Path(args.output_root) / args.model.replace("/", "--"),
        args.eval_prompts, train_options)
