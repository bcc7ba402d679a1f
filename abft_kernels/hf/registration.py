"""Registration of attn_implementation="abft" with transformers, done once transformers' modeling code loads, and
apply_abft.

`import abft_kernels` must not import transformers (about two seconds), yet `from_pretrained(...,
attn_implementation="abft")` must work whenever abft_kernels was imported first. So registration runs at once
if transformers.modeling_utils is already loaded, and otherwise right after its first import, through a
one-shot finder on sys.meta_path that wraps that module's loader.

Registration also wraps three methods of transformers' PreTrainedModel so that every way a model gets the
"abft" implementation goes through patching.py: `_check_and_adjust_attn_implementation` (the start of every
model's __init__, before its layers exist: patching.prepare_abft_class) and `post_init` (the end of it, hence
from_pretrained, from_config and direct construction) and `set_attn_implementation` (both:
patching.prepare_abft_model).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

from .attention import ATTN_IMPLEMENTATION, abft_attention_forward, abft_mask_function
from .patching import is_abft, prepare_abft_class, prepare_abft_model, refuse_unsupported_model, requests_abft

_TRIGGER_MODULE = "transformers.modeling_utils"


def apply_abft(model):
    """Switch `model` to attn_implementation="abft" in place and return it.

    The same as `model.set_attn_implementation("abft")` or `from_pretrained(..., attn_implementation="abft")` once
    abft_kernels is imported: every load path goes through prepare_abft_model, which checks the model, patches what
    needs patching (Falcon) and installs the per-call checks.

    Args:
        model: a transformers PreTrainedModel (any causal LM; see docs/huggingface.md's family tables).

    Returns:
        The same model.

    Raises:
        ValueError: naming the model type and why, for models whose attention cannot run exactly through "abft"
            (attention that computes its own softmax, e.g. ALiBi Bloom; attention that reads the 4-D mask itself;
            no softmax attention at all; see prepare_abft_model).
    """
    register_abft_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def register_abft_attention() -> None:
    """Register the "abft" attention function and mask function with transformers and route model
    construction and set_attn_implementation through prepare_abft_model (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface, PreTrainedModel

    AttentionInterface.register(ATTN_IMPLEMENTATION, abft_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, abft_mask_function)
    if not getattr(PreTrainedModel, "_abft_wrapped", False):
        PreTrainedModel._check_and_adjust_attn_implementation = _prepare_class_after(
            PreTrainedModel._check_and_adjust_attn_implementation)
        PreTrainedModel.post_init = _prepare_after(PreTrainedModel.post_init)
        PreTrainedModel.set_attn_implementation = _set_attn_implementation(PreTrainedModel.set_attn_implementation)
        PreTrainedModel._abft_wrapped = True


def _prepare_class_after(check_and_adjust):
    @functools.wraps(check_and_adjust)
    def check_then_prepare_class(self, attn_implementation, *args, **kwargs):
        implementation = check_and_adjust(self, attn_implementation, *args, **kwargs)
        is_init_check = kwargs.get("is_init_check", args[0] if args else False)
        if implementation == ATTN_IMPLEMENTATION and is_init_check:
            prepare_abft_class(type(self))
        return implementation

    return check_then_prepare_class


def _prepare_after(post_init):
    @functools.wraps(post_init)
    def post_init_then_prepare(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        if is_abft(self.config):
            prepare_abft_model(self)

    return post_init_then_prepare


def _set_attn_implementation(set_attn_implementation):
    @functools.wraps(set_attn_implementation)
    def set_then_prepare(self, attn_implementation, *args, **kwargs):
        from transformers.modeling_utils import PreTrainedModel

        if not requests_abft(attn_implementation):
            return set_attn_implementation(self, attn_implementation, *args, **kwargs)
        refuse_unsupported_model(self)  # before anything changes
        set_attn_implementation(self, attn_implementation, *args, **kwargs)
        if self.config.model_type == "falcon" and attn_implementation == ATTN_IMPLEMENTATION:
            # Falcon's attention does not use the interface, so transformers leaves its implementation unchanged.
            self.config._attn_implementation_internal = ATTN_IMPLEMENTATION
        for module in self.modules():
            if isinstance(module, PreTrainedModel) and is_abft(module.config):
                prepare_abft_model(module)

    return set_then_prepare


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
