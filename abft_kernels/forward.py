"""One ABFT forward pass on a Hugging Face model: the label spec, the model call with the "abft" attention, and the
loss on the label masses it returns. Training (`training.ABFTTrainer`) and evaluation (`evaluation.evaluate`)
both use it."""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch

from .hf import LabelSpec
from .loss import ABFTLossInfo, abft_loss
from .settings import PAPER


def abft_forward(model: torch.nn.Module, batch: Dict[str, torch.Tensor], num_classes: int, *,
                 A: float = PAPER.A0, B: float = PAPER.B, count_all_heads: bool = False,
                 logits_to_keep: Union[int, torch.Tensor] = 1) -> Tuple[object, torch.Tensor, ABFTLossInfo]:
    """Run `model` on an ICL batch with the "abft" attention and return its output, ABFT loss and loss info.

    The model must have been loaded with attn_implementation="abft" (`models.load_model`) or patched with
    `hf.apply_abft`; its `outputs.attentions` are then every layer's label masses at the query rows
    (paper, section 4: the attention mass on each class's demonstration labels).

    Args:
        model: a causal LM with the "abft" attention.
        batch: an `icl.ICLCollator` batch on the model's device: input_ids long [B,N], attention_mask [B,N]
            (1 = real token), key_class long [B,N] (-1 = not a label), query_rows long [B,R] (-1 = empty slot),
            target_class long [B,R] (-1 = no target).
        num_classes: C, the number of label classes.
        A, B: the loss's wrong-label and gold-label weights (paper: A0 = 0.5, steered by the PID; B = 1).
        count_all_heads: ablation, every head in the loss (see `abft_loss`).
        logits_to_keep: forwarded to the model: 1 = the last position's logits (training), or a [B,R] tensor
            of rows (evaluation reads the query row's logits).

    Returns:
        (outputs, loss, info): the model's output (logits for `logits_to_keep`, attentions = masses
        [B,H,R,C] float32 per layer), the loss (0-d tensor, differentiable w.r.t. the query and key
        projections) and `loss.ABFTLossInfo`.

    Raises:
        ValueError: from `LabelSpec`, the attention or `abft_loss` when the batch's tensors do not fit.
    """
    spec = LabelSpec(batch["key_class"], batch["query_rows"], num_classes)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], abft=spec,
                    output_attentions=True, use_cache=False, logits_to_keep=logits_to_keep)
    loss, info = abft_loss(list(outputs.attentions), batch["target_class"], batch["key_class"], batch["query_rows"],
                           A=A, B=B, key_padding_mask=batch["attention_mask"].bool(), count_all_heads=count_all_heads)
    return outputs, loss, info
