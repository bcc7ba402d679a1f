"""LabelSpec: the label information one forward call carries to every attention layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ops.label_attention import BACKENDS, check_integer


def _check_index_tensor(name: str, t, shape_hint: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = getattr(t, "shape", type(t).__name__)
        raise ValueError(f"{name} must be a 2-D integer tensor {shape_hint}, got {got}")
    check_integer(name, t)


@dataclass(frozen=True, eq=False)  # compared by identity: its fields are tensors
class LabelSpec:
    """Pass as `model(..., abft=LabelSpec(...), output_attentions=True)` to get every layer's label masses.

    Every attention layer of the call then runs `label_attention` with these labels, and `outputs.attentions` holds,
    per layer, float32 masses [B, Hq, R, C] (autograd intact) instead of attention weights: the attention mass that
    each row of `query_rows` puts on each class's label tokens (ABFT's input, arXiv 2505.14233 §3).

    Args:
        key_class: integer [B, N], N the length of input_ids: the class of each token as a key, -1 = not a label
            token, else 0 .. num_classes - 1 (demonstration label words).
        query_rows: integer [B, R]: the positions whose masses are returned (ABFT: [[N_b - 1]], the query token),
            -1 = empty slot (mass 0); or None for every position (R = N).
        num_classes: C >= 1.
        backend: the label_attention backend (default "auto": see abft_kernels.resolve_backend).

    Construction checks types and shapes (no host sync). The values (class ids in [-1, num_classes), rows in
    [-1, N)) are checked once per model call, in the same host sync as the call's other checks; the attention
    layers then skip those checks (also when gradient checkpointing recomputes them).

    Raises:
        ValueError: key_class or query_rows not a 2-D integer tensor, of different batch sizes or devices;
            num_classes not a positive int; an unknown backend. In the model call: values out of range, a call
            without output_attentions=True, past key values, a sliding window shorter than the prompt, attention
            dropout, or a model whose layers drop the abft= keyword (see docs/huggingface.md).
    """

    key_class: torch.Tensor
    query_rows: Optional[torch.Tensor]
    num_classes: int
    backend: str = "auto"
    values_checked: bool = field(default=False, init=False, repr=False)  # set by a model call's check

    def __post_init__(self):
        _check_index_tensor("key_class", self.key_class, "[B, N]")
        if self.query_rows is not None:
            _check_index_tensor("query_rows", self.query_rows, "[B, R]")
            if self.query_rows.shape[0] != self.key_class.shape[0]:
                raise ValueError(f"query_rows must have B={self.key_class.shape[0]} rows like key_class, "
                                 f"got shape {tuple(self.query_rows.shape)}")
            if self.query_rows.device != self.key_class.device:
                raise ValueError(f"query_rows is on {self.query_rows.device} but key_class is on "
                                 f"{self.key_class.device}; both must share one device")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
