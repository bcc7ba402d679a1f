"""Registration of attn_implementation="abft" with transformers, done once transformers' modeling code loads.

`import abft_kernels` must not import transformers (about two seconds), yet `from_pretrained(...,
attn_implementation="abft")` must work whenever abft_kernels was imported first. So registration runs at once
if transformers.modeling_utils is already loaded, and otherwise right after its first import, through a
one-shot finder on sys.meta_path that wraps that module's loader.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from .attention import ATTN_IMPLEMENTATION, abft_attention_forward, abft_mask_function

_TRIGGER_MODULE = "transformers.modeling_utils"


def register_abft_attention() -> None:
    """Register the "abft" attention function and mask function with transformers (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, abft_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, abft_mask_function)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers.modeling_utils through the other finders and registers once it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_abft_attention()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_transformers_loads() -> None:
    """Register now if transformers' modeling code is loaded, else after it loads; nothing without transformers."""
    if _TRIGGER_MODULE in sys.modules:
        register_abft_attention()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
