"""apply_abft: switch an already-loaded model to attn_implementation="abft"."""
from __future__ import annotations

from .attention import ATTN_IMPLEMENTATION
from .registration import register_abft_attention


def apply_abft(model):
    """Switch `model` (a transformers PreTrainedModel) to attn_implementation="abft" in place and return it."""
    register_abft_attention()
    if not type(model)._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not use transformers' AttentionInterface, so "
                         "attn_implementation='abft' cannot reach its attention")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
