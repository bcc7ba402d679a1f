"""Hugging Face transformers integration: attn_implementation="abft", per-call label specs, Q/K-only training.

Importing this package does not import transformers; the modules here import it when they run.
"""
from .attention import ATTN_IMPLEMENTATION, abft_attention_forward, abft_mask_function
from .label_spec import LabelSpec
from .registration import apply_abft, register_abft_attention
from .trainable import trainable_qk

__all__ = [
    "ATTN_IMPLEMENTATION", "LabelSpec", "abft_attention_forward", "apply_abft", "abft_mask_function",
    "register_abft_attention", "trainable_qk",
]
