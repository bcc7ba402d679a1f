"""trainable_qk: freeze everything but the query and key projections (ABFT trains W_Q and W_K only).

Separate projections (q_proj, k_proj) are trained whole. A fused QKV projection is trained whole too, but
the gradient of its value slice is zeroed by a hook, so the values never move (with an optimizer without
weight decay, as the paper's Adam). Each fused layout is read off the attention module:

* GPT-2 `c_attn` (Conv1D, weight [in, 3E]): output features [q | k | v].
* GPT-NeoX `query_key_value`: per head [q | k | v], head_size features each.
* Phi-3 `qkv_proj`: [q (H·d) | k (Hkv·d) | v (Hkv·d)].
* Falcon `query_key_value`: per kv group [q x G | k | v] (new decoder architecture), per head
  [q | k | v] (multi-head), or [q x H | k | v] (multi-query).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import List, Optional, Tuple

import torch

_SEPARATE = ("q_proj", "k_proj")
_FUSED = ("c_attn", "query_key_value", "qkv_proj")


def _falcon_value_features(module) -> torch.Tensor:
    d, num_heads = module.head_dim, module.num_heads
    if module.new_decoder_architecture:
        group = num_heads // module.num_kv_heads
        starts = torch.arange(module.num_kv_heads) * (group + 2) * d + (group + 1) * d
    elif module.multi_query:
        starts = torch.tensor([(num_heads + 1) * d])
    else:
        starts = torch.arange(num_heads) * 3 * d + 2 * d
    return (starts[:, None] + torch.arange(d)).flatten()


def _value_features(attention: torch.nn.Module, fused_name: str) -> torch.Tensor:
    """Output-feature indices of the value slice of `attention`'s fused projection."""
    if fused_name == "c_attn":  # GPT-2
        if getattr(attention, "is_cross_attention", False):
            raise ValueError("trainable_qk does not support GPT-2 cross-attention layers")
        embed = attention.split_size
        return torch.arange(2 * embed, 3 * embed)
    if fused_name == "qkv_proj":  # Phi-3
        num_heads, d = attention.config.num_attention_heads, attention.head_dim
        start = (num_heads + attention.num_key_value_heads) * d
        return torch.arange(start, start + attention.num_key_value_heads * d)
    if hasattr(attention, "new_decoder_architecture"):  # Falcon
        return _falcon_value_features(attention)
    if hasattr(attention, "head_size"):  # GPT-NeoX
        d = attention.head_size
        num_heads = attention.config.num_attention_heads
        return (torch.arange(num_heads)[:, None] * 3 * d + 2 * d + torch.arange(d)).flatten()
    raise ValueError(f"trainable_qk does not know the layout of {type(attention).__name__}.{fused_name}")


def _zero_slice(index: torch.Tensor, dim: int, grad: torch.Tensor) -> torch.Tensor:
    return grad.index_fill(dim, index.to(grad.device), 0)


def _qk_projections(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module, Optional[torch.Tensor]]]:
    """(name, projection, value feature indices or None) for every query/key projection of `model`."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if all(part in children for part in _SEPARATE):
            found += [(f"{name}.{part}", children[part], None) for part in _SEPARATE]
            continue
        for fused in _FUSED:
            if fused in children:
                found.append((f"{name}.{fused}", children[fused], _value_features(module, fused)))
    return found


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 layer: weight [in, out]


def trainable_qk(model: torch.nn.Module, lora=None) -> List[torch.nn.Parameter]:
    """Freeze every parameter of `model` except its query and key projections; return the trained parameters.

    lora: None trains the projections themselves. An int r (or a peft.LoraConfig, whose target_modules is
    replaced) adds LoRA adapters of rank r on the query/key projections through peft, in place, and trains
    only those; on a fused QKV projection the adapter's value rows get the same zeroed gradient.
    """
    projections = _qk_projections(model)
    if not projections:
        raise ValueError(f"found no query/key projections ({', '.join(_SEPARATE + _FUSED)}) in {type(model).__name__}")
    for param in model.parameters():
        param.requires_grad_(False)
    if lora is not None:
        projections = _inject_lora(model, projections, lora)
    trained = []
    for _, projection, value_features in projections:
        for param_name, param in projection.named_parameters(recurse=False):
            param.requires_grad_(True)
            trained.append(param)
            if value_features is not None:
                # Conv1D stores [in, out]; Linear and biases put output features first.
                dim = 1 if _is_conv1d(projection) and param_name == "weight" else 0
                param.register_hook(partial(_zero_slice, value_features, dim))
    if hasattr(model, "enable_input_require_grads"):
        # Reentrant gradient checkpointing (transformers 4.57's default) drops the gradients of a block whose
        # inputs do not require grad, which is the case once the embeddings are frozen.
        model.enable_input_require_grads()
    return trained


def _inject_lora(model, projections, lora):
    """Wrap each projection in a peft LoRA layer; return its lora_A and lora_B modules as the projections to
    train, lora_B with the value features of a fused projection."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [name for name, _, _ in projections]
    if isinstance(lora, int) and not isinstance(lora, bool) and lora > 0:
        config = LoraConfig(r=lora, target_modules=names,
                            fan_in_fan_out=any(_is_conv1d(module) for _, module, _ in projections))
    elif isinstance(lora, LoraConfig):
        config = dataclasses.replace(lora, target_modules=names)
    else:
        raise ValueError(f"lora must be None, a positive int rank or a peft.LoraConfig, got {lora!r}")
    inject_adapter_in_model(config, model)
    for param in model.parameters():
        param.requires_grad_(False)
    modules = dict(model.named_modules())
    adapters = []
    for name, _, value_features in projections:
        layer = modules[name]
        for adapter_name in layer.active_adapters:
            adapters.append((f"{name}.lora_A", layer.lora_A[adapter_name], None))
            # lora_B is a Linear(r, out_features): its output rows follow the fused projection's features.
            adapters.append((f"{name}.lora_B", layer.lora_B[adapter_name], value_features))
    return adapters
