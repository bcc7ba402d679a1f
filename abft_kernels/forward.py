"""One ABFT forward pass on a Hugging Face model: the label spec, the model call with the "abft" attention, and the
loss on the label masses it returns. Training (`training.ABFTTrainer`) and evaluation (`evaluation.evaluate`)
both use it; `e2e_forward` is the end-to-end fine-tuning baseline's loss on the same pass."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch

from .hf import LabelSpec
from .loss import ABFTLossInfo, abft_loss
from .loss import PAPER_A0, PAPER_B


def abft_forward(model: torch.nn.Module, batch: Dict[str, torch.Tensor], num_classes: int, *,
                 A: float = PAPER_A0, B: float = PAPER_B, count_all_heads: bool = False,
                 logits_to_keep: Union[int, torch.Tensor] = 1) -> Tuple[object, torch.Tensor, ABFTLossInfo]:
    """Run `model` on an ICL batch with the "abft" attention and return its output, ABFT loss and loss info.

    The model must have been loaded with attn_implementation="abft" (`models.load_model`) or patched with
    `hf.apply_abft`; its `outputs.attentions` are then every layer's label masses at the query rows
    (paper, section 4: the attention mass on each class's demonstration labels).

    Args:
        model: a causal LM with the "abft" attention.
        batch: an `icl.ICLCollator` batch on the model's device: input_ids long [B,N], attention_mask [B,N]
            (1 = real token), key_class long [B,N] (-1 = not a label), query_rows long [B,R] (the read-out rows,
            -1 = empty slot), target_class long [B,R] (-1 = no target), and optionally loss_rows long [B,R]: the rows
            whose label masses the loss and the induction-head filter read (`PromptBuilder(loss_row=...)`; absent:
            query_rows).
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
    loss_rows = batch.get("loss_rows", batch["query_rows"])
    spec = LabelSpec(batch["key_class"], loss_rows, num_classes)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], abft=spec,
                    output_attentions=True, use_cache=False, logits_to_keep=logits_to_keep)
    loss, info = abft_loss(list(outputs.attentions), batch["target_class"], batch["key_class"], loss_rows, A=A, B=B,
                           key_padding_mask=batch["attention_mask"].bool(), count_all_heads=count_all_heads)
    return outputs, loss, info


def e2e_forward(model: torch.nn.Module, batch: Dict[str, torch.Tensor], num_classes: int,
                label_token_ids: Sequence[int]) -> Tuple[object, torch.Tensor, ABFTLossInfo]:
    """The end-to-end fine-tuning baseline's forward (paper, section 5: "E2E"): cross-entropy of the read-out, the
    C label words' next-token logits at each query row, against the gold class.

    The model is called as by `abft_forward` (the "abft" attention, so `info` holds the counted heads and gold-label
    mass of the same pass), but the loss is the cross-entropy alone: A and B play no part.

    Args:
        model, batch, num_classes: as `abft_forward`.
        label_token_ids: the C read-out token ids, class order (`PromptBuilder.label_token_ids`).

    Returns:
        (outputs, loss, info): outputs.logits [B,R,V] at the query rows, the cross-entropy (0-d float32 tensor,
        the mean over the rows with a target) and the `loss.ABFTLossInfo` of the pass.

    Raises:
        ValueError: len(label_token_ids) != num_classes; as `abft_forward`.
    """
    if len(label_token_ids) != num_classes:
        raise ValueError(f"label_token_ids has {len(label_token_ids)} tokens for {num_classes} classes")
    rows = batch["query_rows"].clamp(min=0)  # an empty slot (-1) has target -1: read anywhere, ignored below
    outputs, _, info = abft_forward(model, batch, num_classes, logits_to_keep=rows)
    label_ids = torch.as_tensor(list(label_token_ids), device=outputs.logits.device)
    logits = outputs.logits[..., label_ids].float()  # [B,R,C]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_class"].flatten(), ignore_index=-1)
    return outputs, loss, info
