"""ABFT training on transformers' Trainer: checkpointing, resume, logging, mixed precision and multi-GPU
(`accelerate launch` / torchrun, FSDP) come from the library; this module adds the loss, the PID
controller of A, and a checkpoint format that holds only the trained Q/K weights.

Saved folder (the final output and every checkpoint-N/): `abft_weights.safetensors` (the trained
tensors by parameter name) and `abft_config.json` (base model, LoRA rank, run settings, controller
state). `apply_trained_weights` puts them back on a freshly loaded base model.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from .hf import LabelSpec, trainable_qk
from .loss import PIDController, abft_loss

WEIGHTS_FILE = "abft_weights.safetensors"
CONFIG_FILE = "abft_config.json"


@dataclass
class ABFTSettings:
    """The method's hyperparameters (paper defaults)."""

    A0: float = 0.5  # initial weight of the wrong-label term
    B: float = 1.0  # weight of the gold-label term
    kp: float = 0.03  # PID constants steering A from the mean number of counted heads
    ki: float = 0.005
    kd: float = 0.005


def abft_training_arguments(output_dir: str, *, learning_rate: float = 2e-5, steps: int = 32,
                            prompts_per_step: int = 32, micro_batch: int = 8, seed: int = 42,
                            save_steps: int = 8, **overrides: Any) -> TrainingArguments:
    """The paper's optimiser: Adam (AdamW without weight decay), constant lr, no clipping, `prompts_per_step`
    prompts per step by gradient accumulation over `micro_batch`-sized batches on every process. A checkpoint
    every `save_steps` steps (0: none), the last two kept. `overrides`: any other TrainingArguments."""
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
    return TrainingArguments(**settings)


class ABFTController(TrainerCallback):
    """Collects what the loss saw over one optimiser step and updates A once per step (PID)."""

    def __init__(self, pid: PIDController):
        self.pid = pid
        self.last: Dict[str, float] = {}
        self._sums = torch.zeros(4, dtype=torch.float64)  # loss, counted heads, gold mass, prompts

    @property
    def A(self) -> float:
        return self.pid.A

    def record(self, loss: torch.Tensor, info, num_prompts: int) -> None:
        per_prompt_gold = info.gold_mass.mean(dim=(0, 2, 3))  # [B]
        self._sums += torch.tensor([float(loss) * num_prompts, float(info.counted_heads.sum()),
                                    float(per_prompt_gold.sum()), num_prompts], dtype=torch.float64)

    def on_step_end(self, args, state, control, **kwargs):
        sums = self._sums.to(args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # every process steers A from the same global mean
        loss, heads, gold, prompts = (sums / sums[3].clamp(min=1)).tolist()
        A_used = self.pid.A
        self.pid.update(heads)
        self.last = {"abft_loss": loss, "counted_heads": heads, "gold_mass": gold, "A": A_used, "next_A": self.pid.A}
        self._sums.zero_()


class ABFTProgressCallback(ProgressCallback):
    """Transformers' progress bar, with the step's loss, counted heads and A beside it."""

    def __init__(self, controller: ABFTController):
        super().__init__()
        self.controller = controller

    def on_step_end(self, args, state, control, **kwargs):
        last = self.controller.last  # the controller's on_step_end ran first: it was added before this callback
        if self.training_bar is not None and last:
            self.training_bar.set_postfix({"loss": f"{last['abft_loss']:.3f}", "heads": f"{last['counted_heads']:.1f}",
                                           "A": f"{last['A']:.3f}"}, refresh=False)
        super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "train_runtime" in (logs or {}):  # per-step values are on the bar; print only the summary
            super().on_log(args, state, control, logs=logs, **kwargs)


class ABFTTrainer(Trainer):
    """Trainer whose loss is ABFT's; train only what trainable_qk left trainable.

    The data collator must produce input_ids, attention_mask, key_class, query_rows and target_class
    (`abft_kernels.icl.ICLCollator`). `run_info` is written into every saved abft_config.json.
    """

    loss_is_scaled_for_ga = False  # abft_loss is a per-batch mean: the Trainer divides by the accumulation

    def __init__(self, *args, num_classes: int, settings: Optional[ABFTSettings] = None,
                 run_info: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes
        self.settings = settings or ABFTSettings()
        self.run_info = dict(run_info or {})
        s = self.settings
        self.controller = ABFTController(PIDController(s.A0, s.kp, s.ki, s.kd))
        self.add_callback(self.controller)
        if any(type(cb) is ProgressCallback for cb in self.callback_handler.callbacks):  # a console bar
            self.remove_callback(ProgressCallback)
            self.add_callback(ABFTProgressCallback(self.controller))
        self.trained_names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        if not self.trained_names:
            raise ValueError("the model has no trainable parameters: call abft_kernels.hf.trainable_qk(model) first")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = LabelSpec(inputs["key_class"], inputs["query_rows"], self.num_classes)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], abft=spec,
                        output_attentions=True, use_cache=False, logits_to_keep=1)
        loss, info = abft_loss(list(outputs.attentions), inputs["target_class"], inputs["key_class"],
                               inputs["query_rows"], A=self.controller.A, B=self.settings.B,
                               key_padding_mask=inputs["attention_mask"].bool())
        if model.training:
            self.controller.record(loss.detach(), info, inputs["input_ids"].shape[0])
        return (loss, outputs) if return_outputs else loss

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
        config = {**self.run_info, "trained": self.trained_names,
                  "settings": asdict(self.settings), "controller": self.controller.pid.state_dict(),
                  "global_step": self.state.global_step}
        save_trained_weights(output_dir or self.args.output_dir,
                             {name: state_dict[name] for name in self.trained_names}, config)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        config = load_trained_weights(model if model is not None else self.model, resume_from_checkpoint)
        self.controller.pid.load_state_dict(config["controller"])


def save_trained_weights(folder, tensors: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load_trained_weights(model: torch.nn.Module, folder) -> Dict[str, Any]:
    """Copy the saved tensors into `model` (whose LoRA adapters, if any, already exist); returns the config."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} holds no {WEIGHTS_FILE}: not an ABFT output or checkpoint folder")
    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = load_file(str(folder / WEIGHTS_FILE))
    # torch's loader for plain, DDP and FSDP-wrapped modules; strict=False because only Q/K tensors are given.
    result = set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise ValueError(f"{folder / WEIGHTS_FILE} has tensors the model lacks: {result.unexpected_keys[:3]}")
    return config


def apply_trained_weights(model: torch.nn.Module, folder) -> Dict[str, Any]:
    """Load an ABFT output folder onto its (freshly loaded) base model: adds the LoRA adapters when it was
    trained with LoRA (or splits fused projections as trainable_qk does), then copies the trained tensors.
    Returns the folder's config."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    # Recreates the LoRA adapters, or the split of fused projections (their trained features are a parameter of
    # their own), under the names the trained tensors were saved with.
    trainable_qk(model, lora=config.get("lora"))
    load_trained_weights(model, folder)
    for param in model.parameters():
        param.requires_grad_(False)
    return config
