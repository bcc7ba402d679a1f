"""trainable_qk: freeze everything but the query and key projections (ABFT trains W_Q and W_K only)."""
from __future__ import annotations

from typing import List, Optional

import torch


def trainable_qk(model: torch.nn.Module, lora: Optional[int] = None) -> List[torch.nn.Parameter]:
    """Freeze every parameter of `model` except the query and key projections; return the trainable ones."""
    if lora is not None:
        raise ValueError("lora is not supported yet")
    for param in model.parameters():
        param.requires_grad_(False)
    trained = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj"):
            for param in module.parameters():
                param.requires_grad_(True)
                trained.append(param)
    if not trained:
        raise ValueError(f"found no query/key projections (q_proj, k_proj) in {type(model).__name__}")
    return trained
