"""trainable_qk: freeze everything but the query and key projections (ABFT trains W_Q and W_K only).

Which output features of which projection feed the query and key states is found, not looked up by family:
one forward of the model on a few probe tokens runs with an attention function that records each attention
module's query, key and value states (and attends without autograd, so only direct dependencies count), and a
zero vector added to the output of every linear layer. The gradient of a random projection of the query (key,
value) states with respect to those vectors is non-zero exactly at the output features of the attention
module's own linear layers that the query (key, value) states depend on. So separate q_proj/k_proj, fused QKV projections of any layout (GPT-2 c_attn, GPT-NeoX,
Falcon, GPT-BigCode per-head or multi-query, CodeGen qkv_proj, Phi-3 qkv_proj) and low-rank ones
(q_a_proj/q_b_proj, kv_a_proj_with_mqa/kv_b_proj of multi-head latent attention) are all found the same way.

A feature is trained when it feeds the query or key states and not the value states:

* a projection whose every feature is trained (q_proj, k_proj) is trained as it is;
* a projection with other features too (a fused QKV) is split by a parametrization: its weight (and bias)
  becomes the trained features (a parameter) and the other features (a buffer), put together in forward. The
  value features are not a trained tensor, so no optimizer setting (weight decay included) can move them.

A layer whose query or key states depend only on features that also feed its value states (so W_Q or W_K
cannot be trained without moving W_V) is refused with a ValueError.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.nn.utils import parametrize

PROBE_IMPLEMENTATION = "abft_qk_probe"
_PROBE_TOKENS = 8
_STATES = ("query", "key", "value")


@dataclasses.dataclass
class _Projection:
    name: str
    module: torch.nn.Module
    feeds: Dict[str, torch.Tensor]  # "query"/"key"/"value" -> bool [out_features]

    @property
    def trained(self) -> torch.Tensor:
        return (self.feeds["query"] | self.feeds["key"]) & ~self.feeds["value"]


# What the probe attention function records: (attention module, query, key, value) per call.
_probe_calls: List[Tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []


def _probe_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function of the probe: records the states and attends causally (GQA by broadcasting) without
    autograd, so that only direct dependencies count (not those through attention outputs into later layers or
    into later iterations of a looped layer)."""
    _probe_calls.append((module, query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(
        query.detach(), key.detach(), value.detach(), is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _feature_axis(module: torch.nn.Module) -> Optional[int]:
    """The weight axis of a layer's output features: 0 for nn.Linear, 1 for transformers' Conv1D (also once a
    parametrization has made its class a subclass named ParametrizedConv1D)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return 0
    if isinstance(module, Conv1D):
        return 1
    return None


def _is_projection(module: torch.nn.Module) -> bool:
    return _feature_axis(module) is not None


def discover_qk_projections(model: torch.nn.Module) -> List[_Projection]:
    """Every linear layer inside an attention module with the output features feeding its query, key and
    value states (one probe forward of `model`, see the module docstring)."""
    from transformers import PretrainedConfig
    from transformers.modeling_utils import AttentionInterface

    from .patching import _carry_spec_in_position_embeddings

    AttentionInterface.register(PROBE_IMPLEMENTATION, _probe_attention)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type == "falcon":
        _carry_spec_in_position_embeddings(model)  # Falcon 5.0-5.24: its attention then calls the probe too
    configs = {id(m.config): m.config for m in model.modules()
               if isinstance(getattr(m, "config", None), PretrainedConfig)}
    saved_implementations = {key: c._attn_implementation_internal for key, c in configs.items()}
    saved_modes = [(m, m.training) for m in model.modules()]
    deltas: Dict[torch.nn.Module, List[torch.Tensor]] = {}

    def add_delta(module, args, output):
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        delta = torch.zeros(output.shape[-1], dtype=output.dtype, device=output.device, requires_grad=True)
        deltas.setdefault(module, []).append(delta)
        return output + delta

    handles = [m.register_forward_hook(add_delta) for m in model.modules() if _is_projection(m)]
    _probe_calls.clear()
    try:
        for c in configs.values():
            c._attn_implementation_internal = PROBE_IMPLEMENTATION
        model.eval()
        generator = torch.Generator().manual_seed(0)
        with torch.enable_grad():
            try:
                input_ids = torch.randint(0, _vocab_size(model), (1, _PROBE_TOKENS), generator=generator)
                model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
            except Exception as exc:  # noqa: BLE001  (any failure of the model code: say what and why)
                raise ValueError(f"trainable_qk could not run {model_type} on {_PROBE_TOKENS} probe tokens to find "
                                 f"its query/key projections: {type(exc).__name__}: {exc}") from exc
            calls = list(_probe_calls)
            _probe_calls.clear()
            return _features_per_projection(model, model_type, calls, deltas)
    finally:
        for handle in handles:
            handle.remove()
        for key, c in configs.items():
            c._attn_implementation_internal = saved_implementations[key]
        for module, training in saved_modes:
            module.training = training


def _vocab_size(model) -> int:
    embeddings = model.get_input_embeddings()
    return getattr(embeddings, "num_embeddings", None) or model.config.vocab_size


def _features_per_projection(model, model_type: str, calls, deltas) -> List[_Projection]:
    if not calls:
        raise ValueError(f"trainable_qk found no attention layer of {model_type} that goes through transformers' "
                         "AttentionInterface, so it cannot tell its query/key projections")
    names = {module: name for name, module in model.named_modules()}
    generator = torch.Generator().manual_seed(0)
    projections: Dict[torch.nn.Module, _Projection] = {}
    for attention, *states in calls:
        inside = [(m, d) for m in attention.modules() if m in deltas for d in deltas[m]]
        for module, delta in inside:
            if module not in projections:
                projections[module] = _Projection(names[module], module, {
                    s: torch.zeros(delta.shape[0], dtype=torch.bool) for s in _STATES})
        for state_name, state in zip(_STATES, states):
            if not (state.requires_grad and inside):
                continue
            weights = torch.randn(state.shape, generator=generator).to(state)
            grads = torch.autograd.grad((state * weights).sum(), [d for _, d in inside], retain_graph=True,
                                        allow_unused=True)
            for (module, _), grad in zip(inside, grads):
                if grad is not None:
                    projections[module].feeds[state_name] |= (grad != 0).cpu()
    found = [p for p in projections.values() if p.trained.any()]
    _refuse_entangled(model_type, calls, projections)
    if not found:
        raise ValueError(f"trainable_qk found no query/key projection features of {model_type} that do not also "
                         "feed the value states")
    return sorted(found, key=lambda p: p.name)


def _refuse_entangled(model_type: str, calls, projections: Dict[torch.nn.Module, _Projection]) -> None:
    """A layer whose query or key features all feed its values too cannot train W_Q / W_K alone, and a layer
    whose query states come from no linear layer of its own (e.g. JetMoE's mixture of attention heads, whose
    queries come from the experts' stacked weights) would never train W_Q."""
    for attention, *_ in calls:
        inside = [p for m, p in projections.items() if any(m is x for x in attention.modules())]
        if not any(p.feeds["query"].any() for p in inside):
            raise ValueError(
                f"trainable_qk cannot train the query projection of {model_type}'s {type(attention).__name__}: its "
                "query states come from no nn.Linear (or Conv1D) inside it (e.g. stacked expert weights), so "
                "only its keys would be trained")
        for state in ("query", "key"):
            feeding = [p for p in inside if p.feeds[state].any()]
            if feeding and not any((p.feeds[state] & ~p.feeds["value"]).any() for p in feeding):
                raise ValueError(
                    f"trainable_qk cannot train the {state} projection of {model_type}'s {type(attention).__name__}: "
                    f"every feature of {', '.join(p.name for p in feeding)} that feeds the {state} states also "
                    "feeds the value states")


class _FrozenFeatures(torch.nn.Module):
    """Parametrization of a weight or bias: the full tensor from its trained output features (the parameter)
    and its frozen ones (a buffer, never a trained tensor), along `axis`."""

    def __init__(self, full: torch.Tensor, trained: torch.Tensor, axis: int):
        super().__init__()
        self.axis = axis
        index = torch.arange(full.shape[axis], device=full.device)
        self.register_buffer("trained_index", index[trained.to(full.device)], persistent=False)
        self.register_buffer("frozen_index", index[~trained.to(full.device)], persistent=False)
        self.register_buffer("frozen", full.detach().index_select(axis, self.frozen_index).clone())

    def forward(self, trained: torch.Tensor) -> torch.Tensor:
        shape = list(trained.shape)
        shape[self.axis] = self.trained_index.numel() + self.frozen_index.numel()
        full = trained.new_empty(shape).index_copy(self.axis, self.frozen_index, self.frozen.to(trained.dtype))
        return full.index_copy(self.axis, self.trained_index, trained)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return full.index_select(self.axis, self.trained_index)


def _train_features(module: torch.nn.Module, name: str, trained: torch.Tensor) -> List[torch.nn.Parameter]:
    """Make exactly the `trained` output features of `module` trainable; returns its trained parameters."""
    if bool(trained.all()):
        params = [p for _, p in module.named_parameters(recurse=False)]
        for p in params:
            p.requires_grad_(True)
        return params
    axis = _feature_axis(module)
    if axis is None:
        raise ValueError(f"trainable_qk cannot split the output features of {name} ({type(module).__name__})")
    params = []
    for tensor_name in ("weight", "bias"):
        tensor = getattr(module, tensor_name, None)
        if tensor is None:
            continue
        if not parametrize.is_parametrized(module, tensor_name):
            parametrize.register_parametrization(
                module, tensor_name, _FrozenFeatures(tensor, trained, axis if tensor_name == "weight" else 0))
        else:  # split by an earlier trainable_qk: the same split again is a no-op, another one is refused
            split = getattr(module.parametrizations, tensor_name)[0]
            if not torch.equal(split.trained_index.cpu(), torch.nonzero(trained).flatten()):
                raise ValueError(f"trainable_qk: {name}.{tensor_name} is already split into trained and frozen "
                                 "features by an earlier call, and not as this model's query/key features are; "
                                 "start from a freshly loaded model")
        original = getattr(module.parametrizations, tensor_name).original
        original.requires_grad_(True)
        params.append(original)
    return params


def trainable_qk(model: torch.nn.Module, lora=None) -> List[torch.nn.Parameter]:
    """Freeze every parameter of `model` except its query and key projections; return the trained parameters.

    Args:
        model: a transformers PreTrainedModel (any attention implementation whose attention goes through
            transformers' AttentionInterface, and rotary Falcon).
        lora: None trains the projections' query/key features themselves. An int r (or a peft.LoraConfig, whose
            target_modules is replaced) adds peft LoRA adapters of rank r on the query/key projections, in place,
            and trains only those; on a fused projection the adapter's value rows are frozen the same way.

    Returns:
        The trained parameters (for the optimizer). Parametrized projections store their trained features as
        `<projection>.parametrizations.weight.original` (and `.bias.original`).

    Raises:
        ValueError: no query/key projection found, the model cannot run on probe tokens, or a layer's query or
        key states cannot be trained without moving its value states; the model already carries peft adapters,
        or lora is given for a model whose projections an earlier call split. Source: ABFT (arXiv 2505.14233) §3
        trains W_Q and W_K only.

    A second call without lora on a model that an earlier call prepared (apply_trained_weights included) finds the
    same projections and changes nothing but which parameters are trainable.
    """
    _refuse_second_kind(model, lora)
    projections = discover_qk_projections(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if lora is not None:
        return _train_lora(model, projections, lora)
    trained = []
    for projection in projections:
        trained += _train_features(projection.module, projection.name, projection.trained)
    return trained


def _refuse_second_kind(model: torch.nn.Module, lora) -> None:
    """Refuse what a second trainable_qk cannot do exactly: adapters on adapters, LoRA on split projections."""
    if getattr(model, "peft_config", None):
        raise ValueError(f"trainable_qk: the model already carries peft adapters ({sorted(model.peft_config)}), from "
                         "an earlier trainable_qk(model, lora=...) or apply_trained_weights; they would be probed as "
                         "projections of their own: start from a freshly loaded base model")
    if lora is not None and _split_tensors(model):
        raise ValueError(f"trainable_qk: lora={lora!r} on a model whose projections an earlier call split for "
                         "full query/key training; start from a freshly loaded base model")


def _split_tensors(model: torch.nn.Module) -> Dict[str, _FrozenFeatures]:
    """{"<module>.<weight|bias>": its split} for every tensor that trainable_qk split into trained and frozen
    features."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, parametrizations in module.parametrizations.items():
                for parametrization in parametrizations:
                    if isinstance(parametrization, _FrozenFeatures):
                        found[f"{name}.{tensor_name}"] = parametrization
    return found


def _runs(index: torch.Tensor) -> List[List[int]]:
    """Sorted indices as [start, stop) runs: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    runs: List[List[int]] = []
    for i in index.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def trained_layout(model: torch.nn.Module) -> Dict[str, Any]:
    """What trainable_qk made of `model`, as JSON, read from the model itself (not from the arguments it was given).

    Args:
        model: a model prepared by `trainable_qk` (or `training.apply_trained_weights`).

    Returns:
        {"lora_config": the peft LoraConfig of its adapters as peft writes it (r, lora_alpha, target_modules,
        fan_in_fan_out, ...; sets as sorted lists), or None without adapters; "split": {"<module>.<weight|bias>":
        [[start, stop], ...], the output features trained, for every tensor split into trained and frozen features}}.

    Raises:
        ValueError: the model carries several adapters or one that is not LoRA.
    """
    configs = getattr(model, "peft_config", None) or {}
    if len(configs) > 1 or any(type(c).__name__ != "LoraConfig" for c in configs.values()):
        raise ValueError(f"trained_layout: the model carries peft adapters {sorted(configs)} of types "
                         f"{sorted(type(c).__name__ for c in configs.values())}; trainable_qk adds one LoRA adapter")
    lora_config = None
    for config in configs.values():
        lora_config = {key: sorted(value) if isinstance(value, set) else value
                       for key, value in config.to_dict().items()}
        lora_config = json.loads(json.dumps(lora_config))  # enums (peft_type) as their values
    split = {name: _runs(p.trained_index.cpu()) for name, p in sorted(_split_tensors(model).items())}
    return {"lora_config": lora_config, "split": split}


def lora_config_from_layout(lora_config: Dict[str, Any]):
    """The peft LoraConfig recorded by `trained_layout` (its "lora_config"), to give to trainable_qk(lora=...)."""
    from peft import LoraConfig

    return LoraConfig.from_peft_type(**lora_config)


def _train_lora(model, projections: List[_Projection], lora) -> List[torch.nn.Parameter]:
    """Wrap each projection in a peft LoRA layer and train its adapters; lora_B (output features first) keeps
    the projection's non-query/key features frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [p.name for p in projections]
    if isinstance(lora, int) and not isinstance(lora, bool) and lora > 0:
        config = LoraConfig(r=lora, target_modules=names,
                            fan_in_fan_out=any(_feature_axis(p.module) == 1 for p in projections))
    elif isinstance(lora, LoraConfig):
        config = dataclasses.replace(lora, target_modules=names)
    else:
        raise ValueError(f"lora must be None, a positive int rank or a peft.LoraConfig, got {lora!r}")
    if getattr(model, "is_quantized", False):
        model.add_adapter(config)  # the same injection, registered with transformers: its Trainer trains a
        # quantized model (--load-in-4bit) only through adapters it knows of
    else:
        inject_adapter_in_model(config, model)
    for param in model.parameters():
        param.requires_grad_(False)
    modules = dict(model.named_modules())
    trained = []
    for projection in projections:
        layer = modules[projection.name]
        for adapter in layer.active_adapters:
            trained += _train_features(layer.lora_A[adapter], f"{projection.name}.lora_A",
                                       torch.ones(layer.lora_A[adapter].out_features, dtype=torch.bool))
            trained += _train_features(layer.lora_B[adapter], f"{projection.name}.lora_B", projection.trained)
    return trained
