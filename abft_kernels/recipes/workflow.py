"""`abft train`, `abft eval`, `abft demo` and `abft export`: the paper's method end to end on any causal LM and dataset.

train: ICL prompts from the dataset's training pool -> ABFT on W_Q/W_K (Trainer) -> output folder with
the trained weights (resumes from its last checkpoint when rerun).
eval:  accuracy and label attention on a fixed held-out set, for the base model and, given --weights,
the trained one: report.json, heatmap.png and a before/after table.
demo:  eval before, train, eval after, on the built-in offline default (SmolLM2-135M-Instruct and
Rotten Tomatoes sentiment), with settings small enough for a laptop CPU.
export: a train output folder as a plain transformers folder and, for LoRA runs, a PEFT adapter folder
(`abft_kernels.export`).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, fields, replace
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from .icl import (PAPER_TASKS, ICLCollator, PromptBuilder, StaICCTask, Template, is_staicc_source, load_staicc,
                  load_task, sample_prompts, staicc_prompts, training_prompts)
from .models import DEFAULT_MODEL
from .settings import (DEMO, PAPER, QUICK, SPLIT_SETTINGS, ABFTSettings, DataSettings, data_settings, given_settings,
                       preset_epilog, training_settings)

# transformers' Trainer and the model code are imported inside the commands: `abft example` stays fast.

EVAL_SEED_OFFSET, TRAIN_SEED_OFFSET = 1, 2  # seeds of the held-out prompts' demonstrations and of training prompts
SETTINGS_TYPE = {"train": ABFTSettings, "demo": ABFTSettings, "eval": DataSettings}


def configure_parser(parser: argparse.ArgumentParser, command: str) -> None:
    """Finish the parser of `abft train/eval/demo`, which HfArgumentParser generated from SETTINGS_TYPE[command].

    Every settings option defaults to None, so that the command knows what was given; the rest comes from the
    preset (PAPER, DEMO or QUICK; for `abft eval --weights`, the training run's split), listed in the epilog.
    Adds the command's run options (output folder, device, threads, and per command --weights, --save-steps,
    --no-resume, --quick).
    """
    parser.set_defaults(**{f.name: None for f in fields(SETTINGS_TYPE[command])})
    presets = {"demo": [("demo", DEMO), ("demo --quick", QUICK)], "train": [("the paper's", PAPER)],
               "eval": [("the paper's", data_settings(PAPER))]}[command]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = preset_epilog(presets)
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=f"runs/{command}")
    run.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    if command == "eval":
        run.add_argument("--weights", help="an `abft train` output folder: evaluate before and after applying it")
    if command == "train":
        run.add_argument("--save-steps", type=int, default=8, help="checkpoint every this many steps (0: never)")
        run.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --output-dir")
    if command == "demo":
        run.add_argument("--quick", action="store_true", help="smoke-size run (seconds, for CI)")


def setup_device(device: Optional[str], threads: Optional[int]) -> torch.device:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # one GPU per process under torchrun / accelerate launch
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def task_template(settings: DataSettings, saved: Optional[dict] = None) -> Optional[Template]:
    if settings.label_words:
        return Template(settings.input_prefix, settings.label_prefix,
                        tuple(w.strip() for w in settings.label_words.split(",")))
    if settings.template:
        if settings.template not in PAPER_TASKS:
            raise ValueError(f"--template must be one of {sorted(PAPER_TASKS)}, got {settings.template!r}")
        return PAPER_TASKS[settings.template].template
    if saved:
        return Template(**{**saved, "label_words": tuple(saved["label_words"])})
    return None


def run_settings(saved: dict) -> dict:
    """The DataSettings of a saved run, by name, as its abft_config.json recorded them ("settings", ABFTSettings'
    names; "base_model", the model they name). A run saved before the loss_row setting used the read-out row."""
    recorded = saved.get("settings") or {}
    run = {f.name: recorded[f.name] for f in fields(DataSettings) if f.name in recorded}
    run["model"] = saved.get("base_model", run.get("model"))
    run.setdefault("loss_row", "read-out")
    return run


def held_out_settings(given: dict, saved: dict) -> DataSettings:
    """The settings that evaluate trained weights on their training run's held-out set: its split, base model,
    k, prompt style and loss row unless given, at most as many prompts.

    Args:
        given: the settings the command line gave (`given_settings`). saved: the run's abft_config.json.

    Raises:
        ValueError: a given split setting differs from the run's (the held-out prompts would overlap the
            training pool), or more held-out prompts than the run held out (except on StaICC's data, whose test
            prompts, up to its 1024, never meet the calibration split that training draws from).
    """
    run = run_settings(saved)
    for name in SPLIT_SETTINGS:
        if name in given and run.get(name) is not None and given[name] != run[name]:
            raise ValueError(f"--{name.replace('_', '-')} {given[name]!r} differs from the training run's "
                             f"{run[name]!r}: the held-out prompts would overlap the training pool")
    if given.get("eval_prompts") is not None and run.get("eval_prompts") is not None \
            and given["eval_prompts"] > run["eval_prompts"] and not is_staicc_source(run.get("dataset", "")):
        raise ValueError(f"--eval-prompts {given['eval_prompts']} exceeds the training run's held-out set "
                         f"({run['eval_prompts']} examples)")
    kept = ("model", "load_in_4bit", "k", "eval_prompts", "prompt_style", "staicc_root", "loss_row") + SPLIT_SETTINGS
    from_run = {name: run[name] for name in kept if run.get(name) is not None}
    return replace(data_settings(PAPER), **{**from_run, **given})


def load_workflow_task(settings: DataSettings, template: Optional[Template]):
    if is_staicc_source(settings.dataset):  # StaICC's fixed splits: eval_prompts, max_chars and seed do not apply
        return load_staicc(settings.dataset, settings.staicc_root)
    return load_task(settings.dataset, template=template, text_column=settings.text_column,
                     label_column=settings.label_column, test_size=settings.eval_prompts,
                     max_chars=settings.max_chars, seed=settings.seed)


def held_out_prompts(tokenizer, task, settings: DataSettings):
    """(builder, prompts): the PromptBuilder of the settings' prompt style and the task's held-out prompts, the same
    for every command and every model (StaICC's prompts in its order for a StaICC task, else demonstrations drawn
    from the training pool with seed + EVAL_SEED_OFFSET)."""
    builder = PromptBuilder(tokenizer, task.template, style=settings.prompt_style, loss_row=settings.loss_row)
    if isinstance(task, StaICCTask):  # StaICC's 1024 prompts (512 test items x 2 demonstration sets), in order
        return builder, staicc_prompts(builder, task, settings.eval_prompts)
    return builder, sample_prompts(builder, task.train, task.test, settings.k, seed=settings.seed + EVAL_SEED_OFFSET)


def held_out_evaluation(tokenizer, task, settings: DataSettings):
    """`evaluate(model, desc=...)` on the task's held-out prompts, built once: the same prompts before and after."""
    from .evaluation import evaluate

    builder, prompts = held_out_prompts(tokenizer, task, settings)
    return partial(evaluate, prompts=prompts, label_token_ids=builder.label_token_ids,
                   pad_token_id=tokenizer.pad_token_id, batch_size=settings.batch_size)


def train_on_task(model, tokenizer, task, settings: ABFTSettings, output_dir: str, save_steps: int = 0,
                  resume: bool = False, callbacks=()):
    """ABFT (or, with settings.objective "e2e", the end-to-end baseline) on `model` (in place) with the prompts of
    `task.train`; the output folder gets the trained weights; `callbacks` (transformers TrainerCallbacks) join the
    Trainer's. Returns (trainer, seconds, peak memory MiB)."""
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .evaluation import peak_memory_mb, reset_peak_memory
    from ..hf import trainable_qk
    from .training import ABFTTrainer, abft_training_arguments

    settings = training_settings(settings)
    device = next(model.parameters()).device
    set_seed(settings.seed)  # LoRA adapters start the same in every run and process
    trainable_qk(model, lora=settings.lora)
    builder = PromptBuilder(tokenizer, task.template, style=settings.prompt_style, loss_row=settings.loss_row)
    prompts = training_prompts(builder, task.train, settings.k, settings.train_prompts,
                               seed=settings.seed + TRAIN_SEED_OFFSET, gold_demonstration=settings.gold_demonstration)
    training_args = abft_training_arguments(
        output_dir, learning_rate=settings.lr, steps=settings.steps, prompts_per_step=settings.prompts_per_step,
        micro_batch=settings.micro_batch, seed=settings.seed, save_steps=save_steps, bf16=settings.bf16,
        report_to=settings.report_to, use_cpu=device.type == "cpu")
    # abft_config.json: the run's settings once, under ABFTSettings' names (ABFTTrainer writes them as "settings"),
    # plus what they leave open: the model they name and the task's template.
    run_info = {"base_model": settings.model or DEFAULT_MODEL, "template": asdict(task.template)}
    trainer = ABFTTrainer(model=model, args=training_args, train_dataset=prompts,
                          data_collator=ICLCollator(tokenizer.pad_token_id), num_classes=task.template.num_classes,
                          settings=settings, run_info=run_info, label_token_ids=builder.label_token_ids)
    for callback in callbacks:
        trainer.add_callback(callback)
    checkpoint = None
    if resume and Path(output_dir).is_dir():
        checkpoint = get_last_checkpoint(output_dir)
        if checkpoint:
            print(f"resuming from {checkpoint}")
    reset_peak_memory(device)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    trainer.save_model(output_dir)
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


def _save(settings: DataSettings, options: dict, out: Path, **sections) -> None:
    from .evaluation import save_report

    save_report(out / "report.json", settings={**asdict(settings), **options}, **sections)


def _dynamics(trainer, out: Path, title: str) -> dict:
    """Plot the training's per-step dynamics beside the other outputs, print the counted heads' band line and
    any warning; returns the report's sections (training_log, count_check, warnings)."""
    from .evaluation import save_dynamics
    from .training import print_count_check

    log = trainer.state.log_history
    check = print_count_check(log)
    save_dynamics(out / "dynamics.png", log, check, title=title)
    return {"training_log": log, "count_check": asdict(check), "warnings": check.warnings}


def _print_table(title: str, out: Path, before, after=None, **extra) -> None:
    from .evaluation import save_heatmap

    save_heatmap(out / "heatmap.png", before, after, title=title)
    table = format_table(title, before, after, extra.get("train_seconds"), extra.get("train_peak_memory_mb"))
    print("\n" + table + f"\n\nreport: {out / 'report.json'}  heatmap: {out / 'heatmap.png'}")


def run_train(args: argparse.Namespace) -> None:
    """`abft train`: the paper's settings unless given; trains, saves the weights, report.json and dynamics.png."""
    from .models import load_model
    from .training import end_process_group

    settings = training_settings(replace(PAPER, **given_settings(args, ABFTSettings)))
    device = setup_device(args.device, args.threads)
    model, tokenizer = load_model(settings.model, device=device, load_in_4bit=settings.load_in_4bit)
    task = load_workflow_task(settings, task_template(settings))
    trainer, seconds, peak = train_on_task(model, tokenizer, task, settings, args.output_dir,
                                           save_steps=args.save_steps, resume=not args.no_resume)
    end_process_group(trainer)
    if not trainer.is_world_process_zero():  # under torchrun the first process writes the report
        return
    out = Path(args.output_dir)
    sections = _dynamics(trainer, out, f"ABFT training: {settings.model or DEFAULT_MODEL} on {settings.dataset}")
    _save(settings, {"output_dir": args.output_dir}, out, train_seconds=seconds, train_peak_memory_mb=peak,
          **sections)
    print(f"trained in {seconds:.0f} s (peak memory {peak:.0f} MiB); weights, report.json and dynamics.png in "
          f"{args.output_dir}; evaluate with: abft eval --weights {args.output_dir}")


def run_eval(args: argparse.Namespace) -> None:
    """`abft eval`: accuracy and label attention before (and after applying --weights) on the held-out set."""
    from .models import load_model
    from .training import apply_trained_weights, read_run_config

    given = given_settings(args, DataSettings)
    saved = read_run_config(args.weights) if args.weights else {}
    settings = held_out_settings(given, saved) if saved else replace(data_settings(PAPER), **given)
    device = setup_device(args.device, args.threads)
    model, tokenizer = load_model(settings.model, device=device, load_in_4bit=settings.load_in_4bit)
    task = load_workflow_task(settings, task_template(settings, saved.get("template")))
    evaluate_held_out = held_out_evaluation(tokenizer, task, settings)
    before = evaluate_held_out(model, desc="eval before")
    after = None
    if args.weights:
        apply_trained_weights(model, args.weights)
        after = evaluate_held_out(model, desc="eval after")
    out = Path(args.output_dir)
    _save(settings, {"output_dir": args.output_dir, "weights": args.weights}, out, before=before, after=after)
    _print_table(f"{settings.model or DEFAULT_MODEL} on {settings.dataset} (k={settings.k}, {before.num_prompts} "
                 f"held-out prompts, seed {settings.seed})", out, before, after)


def standard_error_points(accuracy: float, num_prompts: int) -> float:
    """Binomial standard error of one accuracy measured on `num_prompts` prompts, in accuracy points (%)."""
    return 100 * math.sqrt(accuracy * (1 - accuracy) / max(num_prompts, 1))


def run_demo(args: argparse.Namespace) -> None:
    """`abft demo`: eval before, train, eval after on the built-in model and data with the DEMO (or QUICK) preset."""
    from .models import cache_dir, convert_default_model, load_model

    settings = training_settings(replace(QUICK if args.quick else DEMO, **given_settings(args, ABFTSettings)))
    device = setup_device(args.device, args.threads)
    start = time.perf_counter()
    converted = settings.model in (None, DEFAULT_MODEL) and not (cache_dir() / DEFAULT_MODEL / "config.json").is_file()
    if converted:
        print(f"converting the built-in GGUF once into {cache_dir() / DEFAULT_MODEL} ...")
        convert_default_model()
    conversion_seconds = time.perf_counter() - start if converted else 0.0
    model, tokenizer = load_model(settings.model, device=device, load_in_4bit=settings.load_in_4bit)
    task = load_workflow_task(settings, task_template(settings))
    print(f"seed {settings.seed} (split, demonstrations and training order; --seed to change)")
    evaluate_held_out = held_out_evaluation(tokenizer, task, settings)
    before = evaluate_held_out(model, desc="eval before")
    trainer, train_seconds, train_peak = train_on_task(model, tokenizer, task, settings, args.output_dir)
    after = evaluate_held_out(model, desc="eval after")
    total = time.perf_counter() - start
    title = (f"ABFT demo: {settings.model or DEFAULT_MODEL} on {settings.dataset} (k={settings.k}, "
             f"{before.num_prompts} held-out prompts, seed {settings.seed}, {settings.steps} steps x "
             f"{settings.prompts_per_step} prompts)")
    out = Path(args.output_dir)
    sections = _dynamics(trainer, out, title)
    _save(settings, {"output_dir": args.output_dir, "quick": args.quick}, out, before=before, after=after,
          train_seconds=train_seconds, train_peak_memory_mb=train_peak, conversion_seconds=conversion_seconds,
          total_seconds=total, **sections)
    _print_table(title, out, before, after, train_seconds=train_seconds, train_peak_memory_mb=train_peak)
    print(f"dynamics: {out / 'dynamics.png'}")
    print(f"total {total:.0f} s" + (f" (of which {conversion_seconds:.0f} s converting the GGUF)" if converted else ""))
    error = standard_error_points(after.accuracy, after.num_prompts)
    print(f"note: one run on {after.num_prompts} held-out prompts has a standard error of about {error:.1f} points "
          f"per accuracy; compare seeds (--seed) before reading a gain (docs/results.md).")
    for warning in sections["warnings"]:
        print(f"WARNING: {warning}")


def export_run(weights, output_dir, adapter_dir=None, device: str = "cpu") -> Path:
    """Export an ABFT output folder: its base model with the run applied, as a plain transformers folder (with the
    tokenizer) and, for a LoRA run given `adapter_dir`, as a PEFT adapter folder too.

    Args:
        weights: an `abft train` / `ABFTTrainer.save_model` output folder (or a checkpoint-N folder).
        output_dir: the plain transformers folder. adapter_dir: the PEFT adapter folder (LoRA runs only).
        device: where the model is loaded (float32, as `models.load_model` loads it).

    Returns:
        output_dir (Path).

    Raises:
        ValueError: adapter_dir for a run without LoRA; the run was trained on a 4-bit model (its merge would round
            the weights: export its adapter alone with `export_peft_adapter`); from `training.apply_trained_weights`.
    """
    from ..export import export_peft_adapter, export_pretrained
    from .models import load_model
    from .training import apply_trained_weights, read_run_config

    config = read_run_config(weights)
    if (config.get("settings") or {}).get("load_in_4bit") or config.get("load_in_4bit"):  # (older runs: flat)
        raise ValueError(f"{weights} was trained on a 4-bit model: a merged export would round the merged weights; "
                         "export its adapter with export_peft_adapter on the loaded model")
    model, tokenizer = load_model(config.get("base_model"), device=device)
    apply_trained_weights(model, weights)
    if adapter_dir is not None:
        if not config.get("lora_config", config.get("lora")):
            raise ValueError(f"--adapter-dir: {weights} is a full query/key run without LoRA adapters; its export "
                             "is the plain transformers folder alone")
        export_peft_adapter(model, adapter_dir, base_model=config.get("base_model"))
    return export_pretrained(model, output_dir, tokenizer=tokenizer)


def run_export(args: argparse.Namespace) -> None:
    """`abft export`."""
    folder = export_run(args.weights, args.output_dir, adapter_dir=args.adapter_dir, device=args.device)
    print(f"plain transformers folder: {folder} (AutoModelForCausalLM.from_pretrained)"
          + (f"; PEFT adapter: {args.adapter_dir} (PeftModel.from_pretrained)" if args.adapter_dir else ""))
