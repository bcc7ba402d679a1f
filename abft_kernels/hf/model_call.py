"""State of the model call in progress, for what model code cannot pass down or report back itself."""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

from .label_spec import LabelSpec


@dataclass
class ModelCall:
    spec: Optional[LabelSpec]
    grad_enabled: bool  # autograd mode of the call
    used: bool = False  # an attention layer computed masses from `spec`
    masses_without_grad: bool = False  # ... with autograd off although the call had it on


current_call: ContextVar[Optional[ModelCall]] = ContextVar("abft_model_call", default=None)
