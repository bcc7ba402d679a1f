"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use", arXiv 2102.09690), the paper's baseline.

The model's label distribution on content-free queries ("N/A", "", "[MASK]") after the same kind of
demonstrations estimates its bias, p_cf; each test prompt's label distribution p (softmax of the read-out
logits over the label tokens) is divided by it: q = softmax(W p) with W = diag(p_cf)^-1, b = 0, so the
calibrated prediction is argmax_c p_c / p_cf_c. p_cf is the mean of the label distributions over every
(demonstration set, content-free query) pair; the demonstration sets are drawn from the training pool (StaICC's
`contextual_calibration` draws 128 sets of k from its calibration split, with the content-free query "").
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence

import torch

from .evaluation import label_logits
from .icl.data import Example
from .icl.prompts import ICLPrompt, PromptBuilder

CONTENT_FREE_QUERIES = ("N/A", "", "[MASK]")  # Zhao et al. 2021, §5


@dataclass
class CalibrationResult:
    accuracy: float  # calibrated
    uncalibrated_accuracy: float  # vanilla ICL: argmax of the same logits
    content_free_probs: List[float]  # p_cf [C]
    predictions: List[int]  # calibrated
    uncalibrated_predictions: List[int]
    num_prompts: int
    num_content_free_prompts: int


def sample_demonstration_sets(pool: Sequence[Example], k: int, num_sets: int, seed: int) -> List[List[Example]]:
    """`num_sets` sets of k demonstrations, each drawn uniformly without replacement from `pool` (as the test
    prompts' demonstrations are drawn, not class-balanced); sets are independent.

    Raises:
        ValueError: k not in [1, len(pool)] or num_sets < 1.
    """
    if not 1 <= k <= len(pool):
        raise ValueError(f"k must be in [1, {len(pool)}] for a pool of {len(pool)} examples, got {k}")
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    rng = random.Random(seed)
    return [rng.sample(list(pool), k) for _ in range(num_sets)]


def content_free_prompts(builder: PromptBuilder, demonstration_sets: Sequence[Sequence[Example]],
                         queries: Sequence[str] = CONTENT_FREE_QUERIES) -> List[ICLPrompt]:
    """One prompt per (demonstration set, content-free query), set-major; their `gold` is meaningless (0).

    Args:
        builder: the PromptBuilder of the prompts to calibrate (same template and style).
        demonstration_sets: S sets of demonstrations (e.g. `sample_demonstration_sets` on the training pool).
        queries: the content-free query texts.

    Returns:
        S * len(queries) prompts.

    Raises:
        ValueError: no sets or no queries.
    """
    if not demonstration_sets or not queries:
        raise ValueError("content_free_prompts needs at least one demonstration set and one query")
    return [builder.build(demos, Example(query, 0)) for demos in demonstration_sets for query in queries]


def contextual_calibration(model, prompts: Sequence[ICLPrompt], calibration_prompts: Sequence[ICLPrompt],
                           label_token_ids: Sequence[int], pad_token_id: int, batch_size: int = 16,
                           progress: bool = False) -> CalibrationResult:
    """Calibrated (and vanilla) ICL accuracy of `model` on `prompts`, with p_cf from `calibration_prompts`.

    Args:
        model: an HF causal LM.
        prompts: P test prompts (their `gold` is the class id); the read-out is at the last token.
        calibration_prompts: the content-free prompts (`content_free_prompts`).
        label_token_ids: C read-out token ids (`PromptBuilder.label_token_ids`).
        pad_token_id: right padding of the batches.
        batch_size: prompts per forward pass.

    Returns:
        CalibrationResult: accuracy = mean over prompts of [argmax_c p_c / p_cf_c == gold], computed in float64,
        with p = softmax over the label tokens' logits and p_cf the mean of p over the calibration prompts.

    Raises:
        ValueError: no prompts or no calibration prompts.

    Source: Zhao et al. 2021, §5 (W = diag(p_cf)^-1, b = 0); ABFT paper (arXiv 2505.14233) §5 baseline.
    """
    if not prompts or not calibration_prompts:
        raise ValueError("contextual_calibration needs at least one prompt and one calibration prompt")
    content_free = label_logits(model, calibration_prompts, label_token_ids, pad_token_id, batch_size, progress,
                                desc="content-free")
    p_cf = content_free.double().softmax(-1).mean(0)
    probs = label_logits(model, prompts, label_token_ids, pad_token_id, batch_size, progress,
                         desc="calibrated eval").double().softmax(-1)
    gold = torch.tensor([p.gold for p in prompts])
    vanilla, calibrated = probs.argmax(-1), (probs / p_cf).argmax(-1)
    return CalibrationResult(accuracy=float((calibrated == gold).double().mean()),
                             uncalibrated_accuracy=float((vanilla == gold).double().mean()),
                             content_free_probs=p_cf.tolist(), predictions=calibrated.tolist(),
                             uncalibrated_predictions=vanilla.tolist(), num_prompts=len(prompts),
                             num_content_free_prompts=len(calibration_prompts))
