"""State of the model call in progress, and the checks made once per call.

Every model with attn_implementation="abft" gets two hooks (installed by patching.prepare_abft_model):

* `enter_call`, before the forward: the call's label spec goes into a context variable that the attention
  layers read; a model inside a call in progress (e.g. the base model of a causal LM) gets the spec passed on
  in its keywords where the outer model's code drops it. Then the call's inputs are checked in one host sync:
  the LabelSpec's values, whether the 2-D attention mask pads anything (read by the mask function), and
  position ids that restart (packed sequences).
* `leave_call`, after it: a spec that reached no attention layer, or whose masses were computed with autograd
  off although the call had it on (reentrant gradient checkpointing runs the layers under no_grad), is an error;
  otherwise outputs.attentions keeps only the masses (one per attention layer).
"""
from __future__ import annotations

import inspect
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Set, Tuple

import torch

from ..ops.label_attention.validation import index_value_flags, raise_for_index_values
from .label_spec import LabelSpec

ABFT_KWARG = "abft"
_OTHER_MASK_INPUTS = ("encoder_hidden_states", "encoder_attention_mask", "cross_attention_mask")


@dataclass
class MaskKinds:
    """What the masks built in one model call ask for (read off transformers' mask functions by the "abft"
    mask function)."""

    causal_windows: Set[Optional[int]] = field(default_factory=set)  # causal masks: their window, None = full
    bidirectional: bool = False  # some mask lets every query see every key


@dataclass
class ModelCall:
    owner: torch.nn.Module  # the outermost model whose forward this is
    spec: Optional[LabelSpec]
    grad_enabled: bool  # autograd mode of the call
    token: Optional[Token] = None
    padding_free: Optional[bool] = None  # whether the call's 2-D attention mask is all ones; None = not known
    mask_length: Optional[int] = None  # the length of that mask
    masses_without_grad: bool = False  # ... with autograd off although the call had it on
    mask_kinds: MaskKinds = field(default_factory=MaskKinds)
    masses: List[torch.Tensor] = field(default_factory=list)  # computed from `spec`, in layer order


current_call: ContextVar[Optional[ModelCall]] = ContextVar("abft_model_call", default=None)


@lru_cache(maxsize=None)
def _positional_names(forward_class: type) -> Tuple[str, ...]:
    try:
        parameters = list(inspect.signature(forward_class.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD)


def _call_argument(module, args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    names = _positional_names(type(module))
    return args[names.index(name)] if name in names and names.index(name) < len(args) else None


def enter_call(module, args, kwargs):
    """Forward pre-hook (with_kwargs=True) of an "abft" model."""
    outer = current_call.get()
    if outer is not None:
        if outer.spec is not None and kwargs.get(ABFT_KWARG) is None:
            kwargs[ABFT_KWARG] = outer.spec
            return args, kwargs
        return None
    spec = kwargs.get(ABFT_KWARG)
    call = ModelCall(module, spec, torch.is_grad_enabled())
    call.token = current_call.set(call)  # before any check: leave_call runs even when this hook raises
    if spec is not None:
        if not isinstance(spec, LabelSpec):
            raise ValueError(f"abft must be an abft_kernels.hf.LabelSpec, got {type(spec).__name__}")
        if not kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
            raise ValueError("abft= needs output_attentions=True in the same call: the masses come back as "
                             "outputs.attentions")
    # Masks of other inputs (an encoder's, for cross-attention) must not borrow the padding flag of this one.
    other_masks = any(kwargs.get(name) is not None for name in _OTHER_MASK_INPUTS)
    _check_call(call, None if other_masks else _call_argument(module, args, kwargs, "attention_mask"),
                _call_argument(module, args, kwargs, "position_ids"))
    return None


def leave_call(module, args, output):
    """Forward hook (always_call=True) of an "abft" model."""
    call = current_call.get()
    if call is None or call.owner is not module:
        return
    current_call.reset(call.token)
    if output is None or call.spec is None:  # output is None when the forward raised
        return
    if not call.masses:
        raise ValueError(f"abft= reached no attention layer of {type(module).__name__}: its modelling code "
                         "does not pass extra keywords to the attention")
    if call.masses_without_grad:
        raise ValueError(f"abft= masses of {type(module).__name__} were computed with autograd off although the call "
                         "had it on, so they carry no gradient: under reentrant gradient checkpointing (transformers "
                         "4.x's default) enable it with gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                         "{'use_reentrant': False}); a model that runs some layers under no_grad cannot be trained so")
    if getattr(output, "attentions", None) is not None:
        # Only the masses: layers of other kinds (linear attention, state-space) may put other tensors there.
        masses = tuple(a for a in output.attentions if any(a is m for m in call.masses))
        if not masses:
            raise ValueError(f"abft= masses did not come back through outputs.attentions of {type(module).__name__}")
        output.attentions = masses


def _check_call(call: ModelCall, attention_mask, position_ids) -> None:
    """The call's checks that read tensor values, in one host sync per device (one in practice)."""
    spec = call.spec
    flags: Dict[str, torch.Tensor] = {}
    if spec is not None and not spec.values_checked:
        seq_len = spec.key_class.shape[1]
        for i, flag in enumerate(index_value_flags(spec.key_class, spec.num_classes, spec.query_rows, seq_len)):
            flags[f"spec{i}"] = flag
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    if mask is not None:
        flags["padded"] = ~mask.bool().all()
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] > 1:
        flags["restarts"] = (position_ids[..., 1:] - position_ids[..., :-1] != 1).any()
    values = _read_flags(flags)
    if spec is not None and not spec.values_checked:
        raise_for_index_values([values[f"spec{i}"] for i in range(1 + (spec.query_rows is not None))],
                               spec.key_class, spec.num_classes, spec.query_rows, spec.key_class.shape[1])
        object.__setattr__(spec, "values_checked", True)
    if mask is not None:
        call.padding_free, call.mask_length = not values["padded"], mask.shape[1]
    if values.get("restarts") and not values.get("padded"):
        raise ValueError(
            "attn_implementation='abft' does not support packed sequences (position_ids that restart within a "
            "row): pad the sequences into a batch with an attention_mask instead")


def _read_flags(flags: Dict[str, torch.Tensor]) -> Dict[str, bool]:
    by_device: Dict[torch.device, List[str]] = {}
    for name, flag in flags.items():
        by_device.setdefault(flag.device, []).append(name)
    values = {}
    for names in by_device.values():
        values.update(zip(names, torch.stack([flags[n] for n in names]).tolist()))
    return values
