"""Vanilla and contextually calibrated ICL accuracy under StaICC's protocol, per prompt style.

Rebuilds StaICC's test prompts from its exported data (see abft_kernels/recipes/icl/staicc.py), reads out the label
words at the query token as `abft eval` does, and calibrates with content-free queries after demonstration
sets drawn from the training pool (StaICC's calibration split).

    python scripts/staicc_baselines.py --staicc-root $STAICC --dataset mr --prompts 256
"""
import argparse
import json
import time

import torch

from abft_kernels.recipes.calibration import content_free_prompts, contextual_calibration, sample_demonstration_sets
from abft_kernels.recipes.icl import PROMPT_STYLES, PromptBuilder, load_staicc, staicc_prompts
from abft_kernels.recipes.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--staicc-root", required=True, help="folder with splits.json and the JSONL files")
    parser.add_argument("--dataset", default="mr", help="StaICC or paper name (mr, fp, sst5, trec, subj, tee, teh)")
    parser.add_argument("--model", help="HF model name or path (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=1024, help="the first N of StaICC's 1024 test prompts")
    parser.add_argument("--styles", nargs="+", default=list(PROMPT_STYLES), choices=PROMPT_STYLES)
    parser.add_argument("--calibration-sets", type=int, default=128, help="demonstration sets for p_cf (StaICC: 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = load_staicc(args.dataset, args.staicc_root)
    model, tokenizer = load_model(args.model)
    k = len(task.prompt_plan[0][0])
    sets = sample_demonstration_sets(task.train, k, args.calibration_sets, args.seed)
    results = {}
    for style in args.styles:
        start = time.perf_counter()
        builder = PromptBuilder(tokenizer, task.template, style=style)
        prompts = staicc_prompts(builder, task, args.prompts)
        result = contextual_calibration(model, prompts, content_free_prompts(builder, sets), builder.label_token_ids,
                                        tokenizer.pad_token_id, batch_size=args.batch_size, progress=True)
        results[style] = dict(vanilla=result.uncalibrated_accuracy, calibrated=result.accuracy,
                              p_cf=result.content_free_probs, prompts=result.num_prompts,
                              content_free_prompts=result.num_content_free_prompts,
                              read_out_tokens=tokenizer.convert_ids_to_tokens(builder.label_token_ids),
                              seconds=round(time.perf_counter() - start, 1))
        print(json.dumps({style: results[style]}), flush=True)
    print(f"{task.name}, first {args.prompts} prompts, {args.calibration_sets} x 3 content-free prompts")
    print(f"{'style':16} {'vanilla':>8} {'calibrated':>11}")
    for style, r in results.items():
        print(f"{style:16} {r['vanilla']:8.4f} {r['calibrated']:11.4f}")


if __name__ == "__main__":
    main()
