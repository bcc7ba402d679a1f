"""`abft train`, `abft eval` and `abft demo`: the paper's method end to end on any causal LM and dataset.

train: ICL prompts from the dataset's training pool -> ABFT on W_Q/W_K (Trainer) -> output folder with
the trained weights (resumes from its last checkpoint when rerun).
eval:  accuracy and label attention on a fixed held-out set, for the base model and, given --weights,
the trained one: report.json, heatmap.png and a before/after table.
demo:  eval before, train, eval after, on the built-in offline default (SmolLM2-135M-Instruct and
Rotten Tomatoes sentiment), with settings small enough for a laptop CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from .icl import (DEFAULT_TASK, PAPER_TASKS, ICLCollator, PromptBuilder, Template, load_task, sample_prompts,
                  training_prompts)
from .models import DEFAULT_MODEL

# transformers' Trainer and the model code are imported inside the commands: `abft example` stays fast.

# The paper's settings: the defaults of `abft train` and `abft eval`.
PAPER = dict(dataset=DEFAULT_TASK, text_column="text", label_column="label", k=4, max_chars=1024, eval_prompts=512,
             seed=42, lr=2e-5, steps=32, prompts_per_step=32, micro_batch=8, train_prompts=512, A0=0.5, B=1.0,
             kp=0.03, ki=0.005, kd=0.005, batch_size=16)
# `abft demo`: measured to finish in under 15 minutes on 2 CPU cores (README, "ABFT end to end").
# On SmolLM2-135M the paper's lr 2e-5 moves little in so few steps; 5e-4 was the best of 1e-4 ... 2e-3 tried.
DEMO = {**PAPER, "lr": 5e-4, "steps": 16, "prompts_per_step": 16, "train_prompts": 256, "eval_prompts": 200,
        "max_chars": 160}
# `abft demo --quick`: a smoke run (CI).
QUICK = {**DEMO, "steps": 2, "prompts_per_step": 4, "micro_batch": 4, "train_prompts": 8, "eval_prompts": 16,
         "max_chars": 100}
EVAL_SEED_OFFSET, TRAIN_SEED_OFFSET = 1, 2  # seeds of the held-out prompts' demonstrations and of training prompts
# What decides the held-out split: `abft eval --weights` must use the training run's values.
SPLIT_SETTINGS = ("dataset", "text_column", "label_column", "max_chars", "seed")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of one command; every default is None and filled from a preset (PAPER, DEMO or QUICK)."""
    presets = [("demo", DEMO), ("demo --quick", QUICK)] if command == "demo" else [("the paper's", PAPER)]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join(f"{name} defaults: " + " ".join(f"{k}={v}" for k, v in preset.items())
                               for name, preset in presets)
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help=f"HF model path or name (default: {DEFAULT_MODEL}, the built-in GGUF)")
    data.add_argument("--dataset", help=f"built-in task (rt-sentiment, rt-subj), paper dataset (sst2, mr, fp, sst5, "
                                        f"trec, subj, tee, teh), .csv/.jsonl file or hub name (default: {DEFAULT_TASK})")
    data.add_argument("--text-column")
    data.add_argument("--label-column")
    data.add_argument("--template", help="use this paper dataset's template for --dataset (e.g. sst2)")
    data.add_argument("--label-words", help="comma-separated label words, one token each, class id order")
    data.add_argument("--input-prefix", default="input: ", help="with --label-words")
    data.add_argument("--label-prefix", default="label:", help="with --label-words")
    data.add_argument("--k", type=int, help="demonstrations per prompt")
    data.add_argument("--max-chars", type=int, help="drop texts longer than this")
    data.add_argument("--eval-prompts", type=int, help="held-out prompts for evaluation (the held-out set's size)")
    data.add_argument("--seed", type=int, help="seed of the split and of the demonstrations")
    data.add_argument("--output-dir", default=f"runs/{command}")
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--batch-size", type=int, help="evaluation batch size")
    if command == "eval":
        run.add_argument("--weights", help="an `abft train` output folder: evaluate before and after applying it")
        return
    train = parser.add_argument_group("training")
    train.add_argument("--lr", type=float, help="Adam learning rate")
    train.add_argument("--steps", type=int, help="optimiser steps")
    train.add_argument("--prompts-per-step", type=int, help="prompts per optimiser step (gradient accumulation)")
    train.add_argument("--micro-batch", type=int, help="prompts per forward pass on each process")
    train.add_argument("--train-prompts", type=int, help="training prompts built from the training pool")
    train.add_argument("--lora", type=int, help="train LoRA adapters of this rank on W_Q/W_K instead")
    train.add_argument("--A0", type=float, help="initial A (wrong-label weight, PID-steered)")
    train.add_argument("--B", type=float, help="gold-label weight")
    train.add_argument("--kp", type=float)
    train.add_argument("--ki", type=float)
    train.add_argument("--kd", type=float)
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (Trainer)")
    train.add_argument("--report-to", default="none", help="Trainer logging integrations (tensorboard, wandb, ...)")
    if command == "train":
        train.add_argument("--save-steps", type=int, default=8, help="checkpoint every this many steps (0: never)")
        train.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --output-dir")
    if command == "demo":
        parser.add_argument("--quick", action="store_true", help="smoke-size run (seconds, for CI)")


def fill_defaults(args: argparse.Namespace, preset: dict) -> None:
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # one GPU per process under torchrun / accelerate launch
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _template(args, saved: Optional[dict] = None) -> Optional[Template]:
    if args.label_words:
        return Template(args.input_prefix, args.label_prefix, tuple(w.strip() for w in args.label_words.split(",")))
    if args.template:
        if args.template not in PAPER_TASKS:
            raise ValueError(f"--template must be one of {sorted(PAPER_TASKS)}, got {args.template!r}")
        return PAPER_TASKS[args.template].template
    if saved:
        return Template(**{**saved, "label_words": tuple(saved["label_words"])})
    return None


def use_held_out_split(args, saved: dict) -> None:
    """Evaluate trained weights on their training run's held-out set (same split, at most as many prompts),
    with its base model, template and k unless given."""
    for name in SPLIT_SETTINGS:
        given, used = getattr(args, name), saved.get(name)
        if given is None:
            setattr(args, name, used)
        elif used is not None and given != used:
            raise ValueError(f"--{name.replace('_', '-')} {given!r} differs from the training run's {used!r}: "
                             "the held-out prompts would overlap the training pool")
    if args.eval_prompts is not None and saved.get("held_out") is not None and args.eval_prompts > saved["held_out"]:
        raise ValueError(f"--eval-prompts {args.eval_prompts} exceeds the training run's held-out set "
                         f"({saved['held_out']} examples)")
    args.eval_prompts = args.eval_prompts or saved.get("held_out")
    args.model = args.model or saved.get("base_model")
    args.k = args.k or saved.get("k")


def _load_task(args, template: Optional[Template]):
    return load_task(args.dataset, template=template, text_column=args.text_column, label_column=args.label_column,
                     test_size=args.eval_prompts, max_chars=args.max_chars, seed=args.seed)


def held_out_evaluation(tokenizer, task, args):
    """`evaluate(model, desc=...)` on the task's held-out prompts, built once: the same prompts before and after."""
    from .evaluation import evaluate

    builder = PromptBuilder(tokenizer, task.template)
    prompts = sample_prompts(builder, task.train, task.test, args.k, seed=args.seed + EVAL_SEED_OFFSET)
    return partial(evaluate, prompts=prompts, label_token_ids=builder.label_token_ids,
                   pad_token_id=tokenizer.pad_token_id, batch_size=args.batch_size)


def train_on_task(model, tokenizer, task, args, save_steps: int = 0, resume: bool = False):
    """ABFT on `model` (in place) with the prompts of `task.train`; the output folder gets the trained weights.
    Returns (trainer, seconds, peak memory MiB)."""
    from transformers.trainer_utils import get_last_checkpoint

    from .evaluation import peak_memory_mb, reset_peak_memory
    from .hf import trainable_qk
    from .training import ABFTSettings, ABFTTrainer, abft_training_arguments

    device = next(model.parameters()).device
    trainable_qk(model, lora=args.lora)
    builder = PromptBuilder(tokenizer, task.template)
    prompts = training_prompts(builder, task.train, args.k, args.train_prompts, seed=args.seed + TRAIN_SEED_OFFSET)
    training_args = abft_training_arguments(
        args.output_dir, learning_rate=args.lr, steps=args.steps, prompts_per_step=args.prompts_per_step,
        micro_batch=args.micro_batch, seed=args.seed, save_steps=save_steps, bf16=args.bf16,
        report_to=args.report_to, use_cpu=device.type == "cpu")
    run_info = {"base_model": args.model or DEFAULT_MODEL, "lora": args.lora, "dataset": args.dataset,
                "text_column": args.text_column, "label_column": args.label_column, "max_chars": args.max_chars,
                "seed": args.seed, "held_out": args.eval_prompts, "template": asdict(task.template), "k": args.k,
                "learning_rate": args.lr, "steps": args.steps, "prompts_per_step": args.prompts_per_step}
    trainer = ABFTTrainer(model=model, args=training_args, train_dataset=prompts,
                          data_collator=ICLCollator(tokenizer.pad_token_id), num_classes=task.template.num_classes,
                          settings=ABFTSettings(args.A0, args.B, args.kp, args.ki, args.kd), run_info=run_info)
    checkpoint = None
    if resume and Path(args.output_dir).is_dir():
        checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint:
            print(f"resuming from {checkpoint}")
    reset_peak_memory(device)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    return trainer, seconds, peak_memory_mb(device)


def format_table(title: str, before, after=None, train_seconds: Optional[float] = None,
                 train_peak_mb: Optional[float] = None) -> str:
    rows = [("ICL accuracy", lambda r: f"{r.accuracy:.3f}"),
            ("counted heads / prompt", lambda r: f"{r.mean_counted_heads:.1f}"),
            ("gold-label mass", lambda r: f"{r.mean_gold_mass:.4f}")]
    lines = [title, f"{'':26}{'before':>14}{'after':>30}"]
    for name, cell in rows:
        lines.append(f"{name:26}{cell(before):>14}{cell(after) if after else '-':>30}")
    after_time = "-"
    if after is not None:
        after_time = (f"{after.seconds:.0f}" if train_seconds is None
                      else f"train {train_seconds:.0f} + eval {after.seconds:.0f}")
    lines.append(f"{'time (s)':26}{f'eval {before.seconds:.0f}':>14}{after_time:>30}")
    after_peak = after.peak_memory_mb if after else None
    if train_peak_mb is not None and after_peak is not None:
        after_peak = max(after_peak, train_peak_mb)
    lines.append(f"{'peak memory (MiB)':26}{before.peak_memory_mb:>14.0f}"
                 f"{f'{after_peak:.0f}' if after_peak is not None else '-':>30}")
    return "\n".join(lines)


def _finish(args, title, before, after=None, **extra) -> None:
    from .evaluation import save_heatmap, save_report

    out = Path(args.output_dir)
    settings = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in vars(args).items()
                if k != "func"}
    save_report(out / "report.json", settings=settings, before=before, after=after, **extra)
    save_heatmap(out / "heatmap.png", before, after, title=title)
    table = format_table(title, before, after, extra.get("train_seconds"), extra.get("train_peak_memory_mb"))
    print("\n" + table + f"\n\nreport: {out / 'report.json'}  heatmap: {out / 'heatmap.png'}")


def run_train(args) -> None:
    from .models import load_model

    fill_defaults(args, PAPER)
    device = _setup(args)
    model, tokenizer = load_model(args.model, device=device)
    task = _load_task(args, _template(args))
    _, seconds, peak = train_on_task(model, tokenizer, task, args, save_steps=args.save_steps,
                                     resume=not args.no_resume)
    print(f"trained in {seconds:.0f} s (peak memory {peak:.0f} MiB); weights in {args.output_dir}; "
          f"evaluate with: abft eval --weights {args.output_dir}")


def run_eval(args) -> None:
    from .models import load_model
    from .training import CONFIG_FILE, apply_trained_weights

    saved = json.loads((Path(args.weights) / CONFIG_FILE).read_text()) if args.weights else {}
    if saved:
        use_held_out_split(args, saved)
    fill_defaults(args, PAPER)
    device = _setup(args)
    model, tokenizer = load_model(args.model, device=device)
    task = _load_task(args, _template(args, saved.get("template")))
    evaluate_held_out = held_out_evaluation(tokenizer, task, args)
    before = evaluate_held_out(model, desc="eval before")
    after = None
    if args.weights:
        apply_trained_weights(model, args.weights)
        after = evaluate_held_out(model, desc="eval after")
    _finish(args, f"{args.model or DEFAULT_MODEL} on {args.dataset} (k={args.k}, {before.num_prompts} held-out "
                  f"prompts)", before, after)


def run_demo(args) -> None:
    from .models import cache_dir, convert_default_model, load_model

    fill_defaults(args, QUICK if args.quick else DEMO)
    device = _setup(args)
    start = time.perf_counter()
    converted = args.model in (None, DEFAULT_MODEL) and not (cache_dir() / DEFAULT_MODEL / "config.json").is_file()
    if converted:
        print(f"converting the built-in GGUF once into {cache_dir() / DEFAULT_MODEL} ...")
        convert_default_model()
    conversion_seconds = time.perf_counter() - start if converted else 0.0
    model, tokenizer = load_model(args.model, device=device)
    task = _load_task(args, _template(args))
    evaluate_held_out = held_out_evaluation(tokenizer, task, args)
    before = evaluate_held_out(model, desc="eval before")
    trainer, train_seconds, train_peak = train_on_task(model, tokenizer, task, args)
    after = evaluate_held_out(model, desc="eval after")
    total = time.perf_counter() - start
    _finish(args, f"ABFT demo: {args.model or DEFAULT_MODEL} on {args.dataset} (k={args.k}, {before.num_prompts} "
                  f"held-out prompts, {args.steps} steps x {args.prompts_per_step} prompts)",
            before, after, train_seconds=train_seconds, train_peak_memory_mb=train_peak,
            training_log=trainer.state.log_history, conversion_seconds=conversion_seconds, total_seconds=total)
    print(f"total {total:.0f} s" + (f" (of which {conversion_seconds:.0f} s converting the GGUF)" if converted else ""))
