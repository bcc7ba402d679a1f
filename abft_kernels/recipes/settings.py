"""The method's settings in one place: the paper's values as the defaults of one typed dataclass, the presets of
`abft demo` derived from it, and the command lines of `abft train/eval/demo` generated from it by transformers'
HfArgumentParser (as for TrainingArguments).

Source of the paper's values: Cho et al., "Attention Behavior Fine-Tuning" (arXiv 2505.14233), section 5 and
appendix (A0 = 0.5, B = 1, Cp = 0.03, Ci = Cd = 0.005, Adam lr 2e-5, 32 steps of 32 prompts, k = 4), with the
held-out size and longest text of StaICC (512 prompts, 1024 characters).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal, Optional

from .icl.data import DEFAULT_TASK
from ..loss import PAPER_A0, PAPER_B, PAPER_KD, PAPER_KI, PAPER_KP, PAPER_LR

# LoRA rank of `--objective e2e` when --lora is not given: the paper's rank (it trained its models above 10B with
# LoRA r = 16 on W_Q/W_K).
E2E_LORA_RANK = 16


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class DataSettings:
    """What builds the prompts and the held-out split (the options of `abft eval`).

    The examples are shuffled with `seed`; the first `eval_prompts` are the held-out queries, the rest the
    training pool. Held-out demonstrations are drawn with seed + 1, training prompts with seed + 2.

    `loss_row` (the row of each prompt whose label masses the ABFT loss and the induction-head filter read) is kept
    apart from the read-out (the last token's next-token logits, the same in both cases). Its default,
    "label-prefix", is the authors' row, the last ':' of the prompt (the label prefix's colon):

    * the paper's Fig. 1 points at "the last ':'" as the position whose attention is steered;
    * the authors' analysis code (hc495/ICL_Circuit, util/inference.py) reads row -2 of StaICC prompts, whose
      trailing space its StaICC loader strips, i.e. the colon;
    * measured on SmolLM2 at step 0 (issue 23): 0.8-1.5 heads per prompt pass the filter from the trailing space on
      TREC/SST5/TEE against 10.7-13.3 from the colon (MR 3.1 vs 18.1); from the space the count falls to about 0 and
      training stops on those tasks. With only the row changed (lr 2e-4, 16 steps x 16 prompts, seed 42, 512 StaICC
      prompts) ABFT's accuracy from the space -> from the colon: TREC 0.381 -> 0.410 (vanilla 0.348), SST5
      0.293 -> 0.287 (one seed).

    "read-out" is the trailing space in the "staicc" style (the only row before this setting existed); in the
    "space-on-label" style both rows are the colon.
    """

    model: Optional[str] = field(default=None, metadata=_help(
        "a packaged model (smollm2-135m-instruct, the default; gemma3-270m; qwen2.5-coder-0.5b-instruct), a .gguf "
        "file (converted once into the cache), or an HF model path or name"))
    load_in_4bit: bool = field(default=False, metadata=_help(
        "load the model 4-bit quantized (bitsandbytes NF4, bf16 compute; needs bitsandbytes and a CUDA GPU), the "
        "paper's regime for models above 10B; training then needs --lora (the paper: --lora 16 --lr 1e-4)"))
    dataset: str = field(default=DEFAULT_TASK, metadata=_help(
        "built-in task (rt-sentiment, rt-subj), paper dataset (sst2, mr, fp, sst5, trec, subj, tee, teh), "
        ".csv/.jsonl file or hub name"))
    text_column: str = field(default="text", metadata=_help("column of the input text"))
    label_column: str = field(default="label", metadata=_help("column of the label (class id or label word)"))
    template: Optional[str] = field(default=None, metadata=_help(
        "use this paper dataset's template for --dataset (e.g. sst2)"))
    label_words: Optional[str] = field(default=None, metadata=_help(
        "comma-separated label words, one token each, class id order"))
    input_prefix: str = field(default="input: ", metadata=_help("with --label-words"))
    label_prefix: str = field(default="label:", metadata=_help("with --label-words"))
    prompt_style: Literal["staicc", "space-on-label"] = field(default="staicc", metadata=_help(
        "staicc: StaICC's prompts, the paper's (the query ends with the label prefix and its space, read-out = "
        "each bare label word's last token); space-on-label: the prompt ends at the label prefix and the "
        "read-out is the label word with its leading space (abft_kernels.recipes.icl.PROMPT_STYLES)"))
    loss_row: Literal["label-prefix", "read-out"] = field(default="label-prefix", metadata=_help(
        "the query row whose label attention the loss and the induction-head filter read: label-prefix = the token "
        "of the label prefix's last character (the ':' of 'sentiment:'), the authors' row; read-out = the prompt's "
        "last token, whose logits give the read-out (in the staicc style the trailing space; before issue 23 the only "
        "row). The read-out is the same for both (abft_kernels.recipes.icl.LOSS_ROWS)"))
    staicc_root: Optional[str] = field(default=None, metadata=_help(
        "folder of StaICC's exported data (splits.json and the *.jsonl), for --dataset staicc:<name>"))
    k: int = field(default=4, metadata=_help("demonstrations per prompt"))
    max_chars: int = field(default=1024, metadata=_help("drop texts longer than this many characters"))
    eval_prompts: int = field(default=512, metadata=_help("held-out prompts for evaluation (the held-out set's size)"))
    seed: int = field(default=42, metadata=_help("seed of the split and of the demonstrations"))
    batch_size: int = field(default=16, metadata=_help("evaluation batch size (prompts per forward pass)"))


@dataclass(frozen=True)
class ABFTSettings(DataSettings):
    """The method's settings: data (DataSettings), optimiser, loss and controller of A (the options of
    `abft train` and `abft demo`; the defaults are the paper's).

    Loss per counted head: A·(S − m_y) + B·(n_y − m_y) (`abft_kernels.loss.abft_loss`); A starts at A0 and is
    steered once per optimiser step from the mean number of counted heads by `controller`:
    "paper" is the paper's PID (`loss.PIDController`, gains kp, ki, kd), "fixed" keeps A = A0 (the no-PID
    ablation, `loss.FixedA`), "setpoint" is an option for learning rates far above the paper's: the same gains
    scaled by PAPER.lr / lr on the error to the first step's count, with A kept >= 0 (`loss.SetpointController`). Ablations: `count_all_heads` (no induction-head filter),
    A0 = 0 with controller "fixed" (no wrong-label term), B = 0 (no gold-label term). Objective "e2e" replaces the
    loss by the end-to-end baseline's cross-entropy on the read-out (`forward.e2e_forward`, LoRA: `training_settings`).
    """

    objective: Literal["abft", "e2e"] = field(default="abft", metadata=_help(
        "abft: the ABFT loss on the label attention masses (the method); e2e: the paper's end-to-end fine-tuning "
        "baseline, cross-entropy of the read-out (the label words' logits at the query token) against the gold "
        f"class, on LoRA adapters of W_Q/W_K (rank --lora, default {E2E_LORA_RANK}); A and its controller are unused"))
    lr: float = field(default=PAPER_LR, metadata=_help("Adam learning rate (constant, no weight decay)"))
    steps: int = field(default=32, metadata=_help("optimiser steps"))
    prompts_per_step: int = field(default=32, metadata=_help("prompts per optimiser step (gradient accumulation)"))
    micro_batch: int = field(default=8, metadata=_help("prompts per forward pass on each process"))
    train_prompts: int = field(default=512, metadata=_help("training prompts built from the training pool"))
    gold_demonstration: bool = field(default=False, metadata=_help(
        "every training prompt holds a demonstration of its query's class (its demonstrations drawn again until one "
        "is); off: uniform draws, the paper's. On a prompt without one the ABFT loss only pulls attention off the "
        "labels (A·S): with more classes than demonstrations that is many prompts (TREC, k = 4: 43%%)"))
    lora: Optional[int] = field(default=None, metadata=_help("train LoRA adapters of this rank on W_Q/W_K instead"))
    A0: float = field(default=PAPER_A0, metadata=_help("initial A, the weight of the wrong-label term"))
    B: float = field(default=PAPER_B, metadata=_help("B, the weight of the gold-label term"))
    kp: float = field(default=PAPER_KP, metadata=_help("PID proportional gain Cp"))
    ki: float = field(default=PAPER_KI, metadata=_help("PID integral gain Ci"))
    kd: float = field(default=PAPER_KD, metadata=_help("PID derivative gain Cd"))
    controller: Literal["paper", "fixed", "setpoint"] = field(default="paper", metadata=_help(
        "how A is steered: paper = the paper's PID (gains kp, ki, kd); fixed = A stays A0 (no-PID ablation); "
        "setpoint = the gains scaled by 2e-5/lr on the error to the first step's count, A >= 0"))
    count_all_heads: bool = field(default=False, metadata=_help(
        "ablation: every head adds to the loss, not only those passing the induction filter S > T"))
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision (Trainer)"))
    report_to: str = field(default="none", metadata=_help("Trainer logging integrations (tensorboard, wandb, ...)"))


PAPER = ABFTSettings()
# `abft demo`: about 5 minutes on 2 idle CPU cores (docs/recipes.md); how these were chosen: docs/results.md. 24
# steps, not 16: the held-out accuracy rises once the paper's PID has brought the counted heads back from their
# surge, which takes 12 to 24 steps depending on the training prompts (docs/results.md, "accuracy along training").
# The demo keeps the prompt style its settings were measured with (docs/recipes.md).
DEMO = replace(PAPER, prompt_style="space-on-label", lr=2e-4, steps=24, prompts_per_step=16, train_prompts=256,
               eval_prompts=200, max_chars=160)
# `abft demo --quick`: a smoke run (CI).
QUICK = replace(DEMO, steps=2, prompts_per_step=4, micro_batch=4, train_prompts=8, eval_prompts=16, max_chars=100)
# What decides the held-out split: `abft eval --weights` must use the training run's values.
SPLIT_SETTINGS = ("dataset", "text_column", "label_column", "max_chars", "seed")


def training_settings(settings: ABFTSettings) -> ABFTSettings:
    """`settings` as a training run uses them: `--objective e2e` trains LoRA adapters, of rank E2E_LORA_RANK unless
    --lora is given.

    Raises:
        ValueError: --load-in-4bit without --lora (a 4-bit model's weights cannot be trained, only adapters).
    """
    if settings.objective == "e2e" and settings.lora is None:
        settings = replace(settings, lora=E2E_LORA_RANK)
    if settings.load_in_4bit and settings.lora is None:
        raise ValueError("--load-in-4bit needs --lora: the 4-bit quantized W_Q/W_K cannot be trained, only LoRA "
                         "adapters on them (the paper: --lora 16 --lr 1e-4)")
    return settings


def data_settings(settings: DataSettings) -> DataSettings:
    """The DataSettings part of `settings` (e.g. of PAPER, for `abft eval`)."""
    return DataSettings(**{f.name: getattr(settings, f.name) for f in fields(DataSettings)})


def given_settings(namespace, settings_type: type = ABFTSettings) -> dict:
    """The settings a command line gave: the parsers built by `settings_parser` default every field to None."""
    return {f.name: getattr(namespace, f.name) for f in fields(settings_type)
            if getattr(namespace, f.name, None) is not None}


def preset_epilog(presets) -> str:
    """`--help` text listing each preset's values. presets: sequence of (name, settings)."""
    return "\n".join(f"{name} defaults: " + " ".join(f"{f.name}={getattr(values, f.name)}" for f in fields(values))
                     for name, values in presets)
