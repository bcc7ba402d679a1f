"""apply_abft: switch an already-loaded model to attn_implementation="abft".

Besides setting the implementation, apply_abft makes `abft=` reach the attention layers where the model's
own code drops extra keywords, in a way that survives the recompute of gradient checkpointing (the spec
travels as an argument of each checkpointed layer, never as state read during backward):

* hooks on the model: the call's spec is kept in a context variable while the call runs, re-inserted into
  the keywords of the base model (transformers 4.57's GPT2LMHeadModel does not pass them on), and the call
  fails if a spec was given but no attention layer used it, or used it with autograd off (reentrant
  gradient checkpointing runs the layers under no_grad, so their masses would carry no gradient);
* Falcon (its attention does not go through transformers' AttentionInterface, and its decoder layers pass
  no extra keywords): each attention module's forward is replaced by one that calls the "abft" attention
  function, and the spec rides in the rotary position embeddings that every layer receives.
"""
from __future__ import annotations

import types

import torch

from .attention import ATTN_IMPLEMENTATION, abft_attention_forward
from .model_call import ModelCall, current_call
from .registration import register_abft_attention

_ABFT_KWARG = "abft"


def apply_abft(model):
    """Switch `model` (a transformers PreTrainedModel) to attn_implementation="abft" in place and return it.

    Also needed after from_pretrained(..., attn_implementation="abft") for Falcon and, on transformers 4.57,
    for GPT-2 (see the module docstring); harmless otherwise, and it checks every call that passes abft=.
    """
    register_abft_attention()
    if model.config.model_type == "falcon":
        _patch_falcon(model)
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    elif not type(model)._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not use transformers' AttentionInterface, so "
                         "attn_implementation='abft' cannot reach its attention")
    else:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if not getattr(model, "_abft_call_hooks", False):
        _install_call_hooks(model)
        model._abft_call_hooks = True
    return model


def _install_call_hooks(model) -> None:
    tokens = []

    def enter(module, args, kwargs):
        spec = kwargs.get(_ABFT_KWARG)
        # Pushed before any check: `leave` runs even when this hook raises.
        tokens.append(current_call.set(ModelCall(spec, torch.is_grad_enabled())))
        if spec is not None and not kwargs.get("output_attentions", module.config.output_attentions):
            raise ValueError("abft= needs output_attentions=True in the same call: the masses come back as "
                             "outputs.attentions")

    def leave(module, args, output):
        call = current_call.get()
        current_call.reset(tokens.pop())
        if output is None or call.spec is None:
            return
        if not call.used:
            raise ValueError(f"abft= reached no attention layer of {type(module).__name__}: its modelling code "
                             "does not pass extra keywords to the attention")
        if call.masses_without_grad:
            raise ValueError("abft= masses were computed without autograd, as under reentrant gradient "
                             "checkpointing (transformers 4.x's default): enable it with "
                             "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")

    def pass_spec_on(module, args, kwargs):
        call = current_call.get()
        if call is not None and call.spec is not None and _ABFT_KWARG not in kwargs:
            kwargs[_ABFT_KWARG] = call.spec
        return args, kwargs

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, always_call=True)
    if model.base_model is not model:
        model.base_model.register_forward_pre_hook(pass_spec_on, with_kwargs=True)


def _patch_falcon(model) -> None:
    import transformers

    if not transformers.__version__.startswith("5."):
        raise ValueError(f"abft on Falcon needs transformers 5 (found {transformers.__version__}): 4.x builds "
                         "Falcon's attention mask with its own code")
    if model.config.alibi:
        raise ValueError("abft supports rotary Falcon models only, not alibi=True: alibi enters through a 4-D "
                         "mask that label_attention cannot take")
    base = model.base_model
    for layer in base.h:
        layer.self_attention.forward = types.MethodType(_falcon_attention_forward, layer.self_attention)
    base.rotary_emb.register_forward_hook(_add_spec_to_position_embeddings)


def _add_spec_to_position_embeddings(module, args, output):
    call = current_call.get()
    if call is not None and call.spec is not None:
        return (*output, call.spec)
    return None


def _falcon_attention_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                              use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    """FalconAttention.forward (rotary path) through the "abft" attention function.

    position_embeddings is (cos, sin) or (cos, sin, spec).
    """
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    batch, seq_len, _ = hidden_states.shape
    query, key, value = (t.transpose(1, 2) for t in self._split_heads(self.query_key_value(hidden_states)))
    cos, sin, *spec = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    # Falcon's rotary attention applies no attention dropout and scales by 1/sqrt(head_dim).
    out, weights = abft_attention_forward(self, query, key, value, attention_mask, scaling=self.inv_norm_factor,
                                          dropout=0.0, abft=spec[0] if spec else None)
    return self.dense(out.reshape(batch, seq_len, -1)), weights
