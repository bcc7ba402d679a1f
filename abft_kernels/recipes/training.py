"""ABFT training on transformers' Trainer: checkpointing, resume, logging, mixed precision and multi-GPU
(`accelerate launch` / torchrun, FSDP) come from the library; this module adds the loss, the PID
controller of A, and a checkpoint format that holds only the trained Q/K weights.

Saved folder (the final output and every checkpoint-N/): `abft_weights.safetensors` (the trained
tensors by parameter name) and `abft_config.json` (base model, the LoRA config and the split of fused
projections as read from the model, run settings, controller state). `apply_trained_weights` puts them
back on a freshly loaded base model; `abft_kernels.export` turns a run into a plain transformers folder or
a PEFT adapter folder.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from ..forward import abft_forward, e2e_forward
from ..hf import trainable_qk
from ..hf.trainable import lora_config_from_layout, trained_layout
from ..loss import make_controller
from .settings import PAPER, ABFTSettings

WEIGHTS_FILE = "abft_weights.safetensors"
CONFIG_FILE = "abft_config.json"

logger = logging.getLogger(__name__)


def abft_training_arguments(output_dir: str, *, learning_rate: float = PAPER.lr, steps: int = PAPER.steps,
                            prompts_per_step: int = PAPER.prompts_per_step, micro_batch: int = PAPER.micro_batch,
                            seed: int = PAPER.seed, save_steps: int = 8, **overrides: Any) -> TrainingArguments:
    """The paper's optimiser as TrainingArguments (defaults: `settings.PAPER`).

    Adam (AdamW without weight decay), constant lr, no clipping, `prompts_per_step` prompts per step by
    gradient accumulation over `micro_batch`-sized batches on every process (paper, section 5).

    Args:
        output_dir: folder of the checkpoints (and of the final weights, by `ABFTTrainer.save_model`).
        learning_rate: Adam's constant learning rate. steps: optimiser steps.
        prompts_per_step: prompts per optimiser step over all processes.
        micro_batch: prompts per forward pass on each process.
        seed: Trainer seed (data order). save_steps: a checkpoint every this many steps (0: none), the last two kept.
        overrides: any other TrainingArguments field. `bf16=True` on a machine without a CUDA or MPS device sets
            `use_cpu=True` unless given (transformers refuses CPU bf16 otherwise; the Trainer runs on the CPU there
            anyway).

    Returns:
        transformers.TrainingArguments.

    Raises:
        ValueError: prompts_per_step is not a multiple of micro_batch x the number of processes (WORLD_SIZE).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if prompts_per_step % (micro_batch * world_size):
        raise ValueError(f"prompts_per_step={prompts_per_step} must be a multiple of micro_batch={micro_batch} "
                         f"x {world_size} processes")
    settings = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=prompts_per_step // (micro_batch * world_size),
        learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        optim="adamw_torch", seed=seed, logging_steps=1, save_strategy="no", remove_unused_columns=False,
        report_to="none",
    )
    if save_steps:
        settings.update(save_strategy="steps", save_steps=save_steps, save_total_limit=2)
    settings.update(overrides)
    if settings.get("bf16") and "use_cpu" not in overrides and not (
            torch.cuda.is_available() or torch.backends.mps.is_available()):
        settings["use_cpu"] = True
    return TrainingArguments(**settings)


# Counted heads per prompt, relative to the first step's: within BAND of it the count "stayed"; beyond GUARD
# (below start / GUARD or above start * GUARD) the run collapsed or exploded, and the summary warns.
COUNT_BAND, COUNT_GUARD = 2.0, 4.0
# No head counted at the first step: the ABFT loss has no term and the run trains nothing (issue 23).
ZERO_COUNT_WARNING = (
    "no head passed the induction-head filter at the first step (0 counted heads per prompt): the ABFT loss has no "
    "term, so W_Q/W_K do not move (unless every head is counted) and A does not steer anything. What to do: read the "
    "loss at the authors' row (--loss-row label-prefix, the label prefix's ':'; the staicc style's trailing space "
    "passes far fewer heads), count every head (--count-all-heads), or try the other prompt style (--prompt-style)")


@dataclass
class CountCheck:
    """The counted heads per prompt over a training run, against the first step's count (paper, Fig. 5: with the
    PID controller the count stays near its start). Counts are per optimiser step, averaged over its prompts."""

    start: float
    min: float
    max: float
    end: float
    band: List[float]  # [start / COUNT_BAND, start * COUNT_BAND]
    within_band: bool  # every step's count inside the band
    collapsed: bool  # the last step's count is below start / COUNT_GUARD
    exploded: bool  # the last step's count is above start * COUNT_GUARD
    summary: str  # one console line
    warnings: List[str]


def count_check(log_history: List[Dict[str, Any]]) -> CountCheck:
    """Check the counted heads of a training run (`trainer.state.log_history`, one "counted_heads" per step).

    An ABFT run (steps logged with "abft_loss") whose first step counted no head gets ZERO_COUNT_WARNING.

    Raises:
        ValueError: the log has no step with counted heads (no training step ran).
    """
    steps = [entry for entry in log_history if "counted_heads" in entry]
    if not steps:
        raise ValueError("log_history has no step with 'counted_heads': no ABFT training step was logged")
    counts = [entry["counted_heads"] for entry in steps]
    start, end = counts[0], counts[-1]
    band = [start / COUNT_BAND, start * COUNT_BAND]
    within = all(band[0] <= n <= band[1] for n in counts)
    collapsed, exploded = end < start / COUNT_GUARD, start > 0 and end > start * COUNT_GUARD  # 0: warned below
    summary = (f"counted heads per prompt over {len(counts)} steps: start {start:.1f}, min {min(counts):.1f}, "
               f"max {max(counts):.1f}, end {end:.1f}: "
               + ("no head counted at the start" if start == 0 else
                  f"stayed within [{band[0]:.1f}, {band[1]:.1f}] (start /{COUNT_BAND:g} .. x{COUNT_BAND:g})" if within
                  else f"left the band [{band[0]:.1f}, {band[1]:.1f}] (start /{COUNT_BAND:g} .. x{COUNT_BAND:g})"))
    warnings = []
    if start == 0 and "abft_loss" in steps[0]:
        warnings.append(ZERO_COUNT_WARNING)
    if collapsed:
        warnings.append(f"the counted heads collapsed: {end:.1f} per prompt at the last step, below a quarter of "
                        f"the start ({start:.1f}); the loss lost its heads, so 'after' may show no gain. Lower --lr "
                        f"(docs/results.md, 'abft demo'); with more classes than demonstrations, many prompts hold no "
                        f"demonstration of the gold class and their loss only pulls attention off the labels: "
                        f"--gold-demonstration (docs/results.md, 'Prompts without a gold demonstration')")
    if exploded:
        warnings.append(f"the counted heads exploded: {end:.1f} per prompt at the last step, above {COUNT_GUARD:g} x "
                        f"the start ({start:.1f}); the controller did not hold the count (lower --lr)")
    return CountCheck(start, min(counts), max(counts), end, band, within, collapsed, exploded, summary, warnings)


def print_count_check(log_history: List[Dict[str, Any]]) -> CountCheck:
    """`count_check(log_history)`, with its band line and a `WARNING:` line per warning printed to the console (what
    `abft train`, `abft demo` and `abft suite` print after an ABFT training)."""
    check = count_check(log_history)
    print(check.summary)
    for warning in check.warnings:
        print(f"WARNING: {warning}")
    return check


def prompt_sums(info) -> Tuple[float, float]:
    """(counted heads, gold-label mass) of a batch's `loss.ABFTLossInfo`, each summed over its prompts: a prompt's
    counted heads as `info.counted_heads`, its gold mass averaged over layers, heads and rows. The per-step log and
    the evaluation divide them by the number of prompts."""
    per_prompt_gold = info.gold_mass.mean(dim=(0, 2, 3))  # [B]
    return float(info.counted_heads.sum()), float(per_prompt_gold.sum())


def icl_accuracy(prediction) -> Dict[str, float]:
    """compute_metrics for ABFTTrainer: ICL accuracy of the read-out (paper, section 5: the argmax over the label
    words' next-token logits at the query row), reported as eval_accuracy.

    Args:
        prediction: transformers.EvalPrediction from ABFTTrainer's evaluation: predictions float [P,R,C] (the label
            tokens' logits at each query row), label_ids int [P,R] (the gold class; -1 or the Trainer's padding
            -100 = no target).

    Returns:
        {"accuracy": correct / rows with a target} (0.0 when no row has a target).
    """
    logits, target = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    has_target = target >= 0
    correct = (logits.argmax(-1) == target) & has_target
    return {"accuracy": float(correct.sum()) / max(int(has_target.sum()), 1)}


class ABFTController(TrainerCallback):
    """Collects what the loss saw over one optimiser step and updates A once per step.

    `pid`: a controller of A from `loss.make_controller` (attribute A, update(counted_heads), state_dict()), or None
    when the loss has no A (`--objective e2e`): the step's loss (as `loss_name`), counted heads and gold-label mass
    are still logged.
    """

    def __init__(self, pid, loss_name: str = "abft_loss"):
        self.pid = pid
        self.loss_name = loss_name
        self.last: Dict[str, float] = {}
        self._sums = torch.zeros(4, dtype=torch.float64)  # loss, counted heads, gold mass, prompts

    @property
    def A(self) -> float:
        return self.pid.A

    def record(self, loss: torch.Tensor, info, num_prompts: int) -> None:
        self._sums += torch.tensor([float(loss) * num_prompts, *prompt_sums(info), num_prompts], dtype=torch.float64)

    def on_step_end(self, args, state, control, **kwargs):
        sums = self._sums.to(args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # every process steers A from the same global mean
        loss, heads, gold, prompts = (sums / sums[3].clamp(min=1)).tolist()
        self.last = {self.loss_name: loss, "counted_heads": heads, "gold_mass": gold}
        if state.global_step == 1 and heads == 0 and self.pid is not None:  # the first step of an ABFT run
            logger.warning(ZERO_COUNT_WARNING)
        if self.pid is not None:
            A_used = self.pid.A
            self.pid.update(heads)
            self.last.update(A=A_used, next_A=self.pid.A)
        self._sums.zero_()


class ABFTProgressCallback(ProgressCallback):
    """Transformers' progress bar, with the step's loss, counted heads and A beside it."""

    def __init__(self, controller: ABFTController):
        super().__init__()
        self.controller = controller

    def on_step_end(self, args, state, control, **kwargs):
        last = self.controller.last  # the controller's on_step_end ran first: it was added before this callback
        if self.training_bar is not None and last:
            postfix = {"loss": f"{last[self.controller.loss_name]:.3f}", "heads": f"{last['counted_heads']:.1f}"}
            if "A" in last:
                postfix["A"] = f"{last['A']:.3f}"
            self.training_bar.set_postfix(postfix, refresh=False)
        super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "train_runtime" in (logs or {}):  # per-step values are on the bar; print only the summary
            super().on_log(args, state, control, logs=logs, **kwargs)


class ABFTTrainer(Trainer):
    """Trainer whose loss is ABFT's (`forward.abft_forward`), or with settings.objective "e2e" the end-to-end
    baseline's cross-entropy on the read-out (`forward.e2e_forward`); trains only what trainable_qk left trainable.

    Args (besides Trainer's):
        num_classes: C, the number of label classes.
        settings: `settings.ABFTSettings`; the trainer uses its objective, A0, B, controller, kp, ki, kd and
            count_all_heads (default: the paper's). The optimiser comes from `args` (`abft_training_arguments`).
        run_info: written into every saved abft_config.json (base model, split settings, ...).
        label_token_ids: the C read-out token ids (`PromptBuilder.label_token_ids`); needed by objective "e2e".

    The data collator must produce input_ids, attention_mask, key_class, query_rows and target_class
    (`abft_kernels.recipes.icl.ICLCollator`). Each optimiser step logs abft_loss, counted_heads, gold_mass, A (used in
    the step) and next_A into `state.log_history` (paper, Fig. 5); with objective "e2e", e2e_loss, counted_heads
    and gold_mass (no A: the controller does not apply).

    Evaluation (`evaluate()`, `eval_strategy` with an `eval_dataset` of ICL prompts): eval_loss is the run's loss on
    the eval prompts without gradient (ABFT's with A = settings.A0, fixed so that evaluations at different steps
    compare the model, not the controller, which evaluation leaves untouched; with objective "e2e" the
    cross-entropy), averaged over the prompts; eval_counted_heads and eval_gold_mass are per prompt as in the
    training log. With `compute_metrics` (e.g. `icl_accuracy`, giving eval_accuracy) the predictions are the label
    tokens' logits at the query rows [P,R,C] and the labels target_class [P,R]. `metric_for_best_model` can name any
    of these; `load_best_model_at_end` copies the best checkpoint's trained tensors back into the model.

    Raises:
        ValueError: the model has no trainable parameter; an unknown settings.controller; objective "e2e", or
            compute_metrics, without label_token_ids.
    """

    loss_is_scaled_for_ga = False  # abft_loss is a per-batch mean: the Trainer divides by the accumulation

    def __init__(self, *args, num_classes: int, settings: ABFTSettings = PAPER,
                 run_info: Optional[Dict[str, Any]] = None, label_token_ids: Optional[Sequence[int]] = None,
                 **kwargs):
        if settings.objective == "e2e" and label_token_ids is None:
            raise ValueError("objective 'e2e' needs label_token_ids (the read-out tokens, builder.label_token_ids)")
        if kwargs.get("compute_metrics") is not None and label_token_ids is None:
            raise ValueError("compute_metrics needs label_token_ids: its predictions are the label tokens' logits at "
                             "the query rows (builder.label_token_ids)")
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes
        self.settings = settings
        self.run_info = dict(run_info or {})
        self.label_token_ids = label_token_ids
        self._eval_sums = torch.zeros(3, dtype=torch.float64)  # prediction_step's sums, reset by evaluation_loop
        if settings.objective == "e2e":
            self.controller = ABFTController(None, loss_name="e2e_loss")
        else:
            self.controller = ABFTController(make_controller(settings))
        self.add_callback(self.controller)
        if any(type(cb) is ProgressCallback for cb in self.callback_handler.callbacks):  # a console bar
            self.remove_callback(ProgressCallback)
            self.add_callback(ABFTProgressCallback(self.controller))
        self.trained_names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        if not self.trained_names:
            raise ValueError("the model has no trainable parameters: call abft_kernels.hf.trainable_qk(model) first")

    def _forward(self, model, inputs, A: Optional[float] = None, read_out: bool = False):
        """(outputs, loss, info) of the run's objective, ABFT's with A (None: the controller's); read_out: logits at
        the query rows (else at the last position)."""
        if self.settings.objective == "e2e":
            return e2e_forward(model, inputs, self.num_classes, self.label_token_ids)
        rows = inputs["query_rows"].clamp(min=0) if read_out else 1  # an empty slot (-1) has no target
        return abft_forward(model, inputs, self.num_classes, A=self.controller.A if A is None else A,
                            B=self.settings.B, count_all_heads=self.settings.count_all_heads, logits_to_keep=rows)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs, loss, info = self._forward(model, inputs)
        if model.training:
            self.controller.record(loss.detach(), info, inputs["input_ids"].shape[0])
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """One eval batch without gradient: (loss, label logits float32 [B,R,C] or None, target_class [B,R] or
        None); adds the batch's counted heads and gold mass to the evaluation's sums (see evaluation_loop)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs, loss, info = self._forward(model, inputs, self.settings.A0, read_out=not prediction_loss_only)
        self._eval_sums += torch.tensor([*prompt_sums(info), inputs["input_ids"].shape[0]], dtype=torch.float64)
        if prediction_loss_only:
            return loss.detach(), None, None
        label_ids = torch.as_tensor(list(self.label_token_ids), device=outputs.logits.device)
        return loss.detach(), outputs.logits[..., label_ids].float(), inputs["target_class"]

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop (eval_loss, compute_metrics), plus <prefix>_counted_heads and <prefix>_gold_mass per
        prompt, summed over every process."""
        self._eval_sums = torch.zeros(3, dtype=torch.float64)  # counted heads, gold mass, prompts
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        sums = self._eval_sums.to(self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        heads, gold, prompts = sums.tolist()
        if prompts:
            output.metrics[f"{metric_key_prefix}_counted_heads"] = heads / prompts
            output.metrics[f"{metric_key_prefix}_gold_mass"] = gold / prompts
        return output

    def _load_best_model(self) -> None:
        """load_best_model_at_end: the best checkpoint holds only the trained tensors (`_save`); copy them back.
        The controller keeps its state (it steers training, which has ended)."""
        load_trained_weights(self.model, self.state.best_model_checkpoint)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self.controller.last:
            logs = {**logs, **self.controller.last}
        super().log(logs, start_time)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """Save only the trained tensors and what is needed to apply them (and to resume the controller)."""
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        state_dict = state_dict if state_dict is not None else model.state_dict()
        # The LoRA config and the split of fused projections are read from the model itself, so that a run set up
        # through the Python API (trainable_qk(model, lora=...), any LoraConfig) is rebuilt as it was trained.
        config = {"base_model": getattr(model, "name_or_path", None) or None, **self.run_info,
                  **trained_layout(model), "trained": self.trained_names,
                  "settings": asdict(self.settings),
                  "controller": self.controller.pid.state_dict() if self.controller.pid is not None else None,
                  "global_step": self.state.global_step}
        save_trained_weights(output_dir or self.args.output_dir,
                             {name: state_dict[name] for name in self.trained_names}, config)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        config = load_trained_weights(model if model is not None else self.model, resume_from_checkpoint)
        if self.controller.pid is not None:
            self.controller.pid.load_state_dict(config["controller"])


def end_process_group(trainer: Trainer) -> None:
    """Under torchrun / `accelerate launch`: frees the trainer's DistributedDataParallel wrapper, then destroys the
    process group; does nothing in a single process. Call it once training and saving are done, in every process.

    The order matters with gloo (CPU), pytorch/pytorch#190489. Left open to the interpreter's exit, the group's worker
    threads can abort it ("terminate called without an active exception"). Freed last by DDP's reducer, whose binding
    keeps the GIL while the group joins those threads, it deadlocks whenever a worker is still releasing the tensors of
    the last collective (which takes the GIL). Freed by `destroy_process_group`, the group's own binding releases the
    GIL first, so the worker finishes and the join returns.

    Args:
        trainer: the transformers `Trainer` that trained (its `model_wrapped` may be the DDP wrapper).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    torch.distributed.destroy_process_group()


def save_trained_weights(folder, tensors: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
    """Write `tensors` to folder/abft_weights.safetensors and `config` (JSON) to folder/abft_config.json.

    Args:
        folder: created if missing. tensors: the trained tensors by parameter name (any device and dtype).
        config: what `apply_trained_weights` needs (`hf.trainable.trained_layout(model)`: "lora_config" and
            "split"; older folders have only "lora", an int rank) and the run's settings.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_run_config(folder) -> Dict[str, Any]:
    """The abft_config.json of an ABFT output or checkpoint folder (the run's settings, base model, LoRA layout).

    Raises:
        ValueError: the folder holds no abft_config.json (missing, or not an ABFT output or checkpoint folder).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no {CONFIG_FILE}: not an ABFT output or checkpoint folder (a run that is "
                         f"still training writes it at its first checkpoint and at the end)")
    return json.loads(path.read_text())


def load_trained_weights(model: torch.nn.Module, folder) -> Dict[str, Any]:
    """Copy the saved tensors into `model` (whose LoRA adapters, if any, already exist); returns the config.

    Raises:
        ValueError: the folder holds no abft_weights.safetensors, or a tensor the model lacks.
    """
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} holds no {WEIGHTS_FILE}: not an ABFT output or checkpoint folder")
    config = read_run_config(folder)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    # torch's loader for plain, DDP and FSDP-wrapped modules; strict=False because only Q/K tensors are given.
    result = set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise ValueError(f"{folder / WEIGHTS_FILE} has tensors the model lacks: {result.unexpected_keys[:3]}")
    return config


def apply_trained_weights(model: torch.nn.Module, folder) -> Dict[str, Any]:
    """Load an ABFT output folder onto its (freshly loaded) base model: adds the LoRA adapters when it was
    trained with LoRA (or splits fused projections as trainable_qk does), then copies the trained tensors.

    A second call on the same model (with this or another full query/key run) only copies the tensors again:
    the result is that of a freshly loaded base model.

    Args:
        model: the run's base model (config "base_model"), as transformers loads it, or one that an earlier call
            prepared for full query/key weights.
        folder: an `ABFTTrainer.save_model` / `abft train` output folder, or one of its checkpoint-N folders.

    Returns:
        The folder's config (abft_config.json).

    Raises:
        ValueError: the model already carries LoRA adapters; the projections or the split found on this model
            differ from the run's ("lora_config" target_modules, "split"); from trainable_qk and
            load_trained_weights.
    """
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    # Recreates the LoRA adapters (from the run's own peft config; folders of older versions record only the rank,
    # "lora"), or the split of fused projections (their trained features are a parameter of their own), under the
    # names the trained tensors were saved with.
    if "lora_config" in config:
        lora = config["lora_config"] and lora_config_from_layout(config["lora_config"])
    else:
        lora = config.get("lora")
    trainable_qk(model, lora=lora)
    if "split" in config:
        found, saved = trained_layout(model), {key: config[key] for key in ("lora_config", "split")}
        targets = [sorted((layout["lora_config"] or {}).get("target_modules") or []) for layout in (found, saved)]
        if targets[0] != targets[1] or found["split"] != saved["split"]:
            raise ValueError(f"{folder} was trained on other query/key features than trainable_qk finds on this "
                             f"model (LoRA targets {targets[1]} vs {targets[0]}, split {saved['split']} vs "
                             f"{found['split']}): not its base model, or another transformers version's layout")
    load_trained_weights(model, folder)
    for param in model.parameters():
        param.requires_grad_(False)
    return config
