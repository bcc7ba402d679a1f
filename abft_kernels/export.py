"""Export an ABFT run to what the ecosystem loads without this package.

* `export_pretrained`: a plain transformers folder (`AutoModelForCausalLM.from_pretrained(folder)`): LoRA
  adapters merged into their projections and the split of fused projections put back into one weight
  (`torch.nn.utils.parametrize.remove_parametrizations(..., leave_parametrized=True)`).
* `export_peft_adapter`: for a LoRA run, a standard PEFT adapter folder (adapter_config.json and
  adapter_model.safetensors, `peft.PeftModel.from_pretrained(base, folder)`).

Both from an `abft train` / `ABFTTrainer.save_model` output folder: `recipes.workflow.export_run` (`abft export`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.nn.utils import parametrize

from .hf.trainable import _split_tensors

ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _lora_config(model: torch.nn.Module):
    """The model's one peft LoRA config, or None without adapters."""
    configs = getattr(model, "peft_config", None) or {}
    if len(configs) > 1 or any(type(c).__name__ != "LoraConfig" for c in configs.values()):
        raise ValueError(f"model carries peft adapters {sorted(configs)} of types "
                         f"{sorted(type(c).__name__ for c in configs.values())}; trainable_qk adds one LoRA adapter")
    return next(iter(configs.values()), None)


def merge_trained_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Turn a model prepared by trainable_qk (or apply_trained_weights) into the plain model it computes, in place.

    Each peft LoRA layer is merged into its base projection (W + scaling * B A, peft's `merge`) and replaced by
    it; each split weight or bias becomes one tensor again (`remove_parametrizations(..., leave_parametrized=True)`,
    trained and frozen features together). The model's parameters are left frozen.

    Args:
        model: a transformers model, after `hf.trainable_qk` or `training.apply_trained_weights`.

    Returns:
        `model` itself, now with the module classes and parameter names of its base model.

    Raises:
        ValueError: the model is quantized (merging LoRA into 4-bit weights rounds them: export the PEFT adapter
            instead), or carries several adapters or one that is not LoRA.
    """
    config = _lora_config(model)
    if config is not None:
        if getattr(model, "is_quantized", False):
            raise ValueError("merge_trained_weights: the model is quantized, so merging its LoRA adapters would round "
                             "the merged weights; export the PEFT adapter (export_peft_adapter) instead, or load the "
                             "base model unquantized and apply the run there")
        from peft.tuners.lora import LoraLayer

        modules = dict(model.named_modules())
        for name, module in list(modules.items()):
            if isinstance(module, LoraLayer):
                module.merge()  # the active adapter; lora_B reads through its split, value rows frozen at 0
                parent, _, child = name.rpartition(".")
                setattr(modules[parent] if parent else model, child, module.get_base_layer())
        del model.peft_config
    for name, split in _split_tensors(model).items():
        module_name, _, tensor_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def export_pretrained(model: torch.nn.Module, folder, tokenizer=None) -> Path:
    """Save `model` as a plain transformers folder that loads without this package, LoRA merged.

    In place, as peft's merge_and_unload: the model becomes the plain model it saves (`merge_trained_weights`).
    The folder's config names no attention implementation (transformers does not save it), so the loader picks its
    default one.

    Args:
        model: a transformers model after `hf.trainable_qk` / training or `training.apply_trained_weights`.
        folder: the output folder (created). tokenizer: saved beside the weights when given.

    Returns:
        The folder (Path).

    Raises:
        ValueError: from `merge_trained_weights`.
    """
    folder = Path(folder)
    merge_trained_weights(model)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def export_peft_adapter(model: torch.nn.Module, folder, base_model: Optional[str] = None) -> Path:
    """Save a LoRA run's adapters as a standard PEFT adapter folder; the model is not changed.

    The adapter of a fused projection (GPT-2 c_attn, GPT-NeoX query_key_value, ...) is saved whole: its lora_B
    rows of the value features are those frozen at zero, so PEFT computes the same projection.

    Args:
        model: a transformers model with the LoRA adapters of `hf.trainable_qk(model, lora=...)` (trained or
            applied by `training.apply_trained_weights`).
        folder: the output folder (created). base_model: recorded as the adapter's base_model_name_or_path
            (default: the model's name_or_path).

    Returns:
        The folder (Path): adapter_config.json and adapter_model.safetensors, for
        `peft.PeftModel.from_pretrained(base, folder)`.

    Raises:
        ValueError: the model has no LoRA adapter (a full query/key run: use `export_pretrained`), several, or
            one that is not LoRA.
    """
    import dataclasses

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = _lora_config(model)
    if config is None:
        raise ValueError("export_peft_adapter: the model has no LoRA adapter (a full query/key run): export it with "
                         "export_pretrained")
    # The state dict with every split tensor whole, under its plain name ("<module>.lora_B.default.weight"), which
    # peft's own reader turns into the adapter's keys.
    splits = _split_tensors(model)
    state = {name: tensor for name, tensor in model.state_dict().items() if ".parametrizations." not in name}
    for name in splits:
        module_name, _, tensor_name = name.rpartition(".")
        state[name] = getattr(model.get_submodule(module_name), tensor_name).detach()
    adapter = get_peft_model_state_dict(model, state_dict=state, adapter_name=next(iter(model.peft_config)),
                                        save_embedding_layers=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # PeftModel's keys: its LoraModel (base_model) wraps the transformers model (model).
    save_file({f"base_model.model.{name}": t.contiguous().cpu() for name, t in adapter.items()},
              str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    name_or_path = base_model or getattr(model, "name_or_path", None) or None
    dataclasses.replace(config, base_model_name_or_path=name_or_path, inference_mode=True).save_pretrained(folder)
    return folder
