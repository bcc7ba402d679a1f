"""Backends of label_attention: one module per implementation, each exposing
``MAX_NUM_CLASSES`` and ``label_attention(args) -> (out, mass)``."""
