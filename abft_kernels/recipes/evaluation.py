"""ICL evaluation with the paper's read-out, and what the attention heads do at the query token.

Read-out: the prediction is the argmax of the query token's next-token logits over the label words'
tokens. In the same forward pass the "abft" attention returns every layer's label-class masses at
each prompt's loss row (`ICLPrompt.loss_row`: the label prefix's ':' by default, else the query token), from which
come the counted (induction) heads and the gold-label attention mass per (layer, head), the quantities ABFT
trains.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..forward import abft_forward
from .icl.prompts import ICLCollator, ICLPrompt


@dataclass
class EvalResult:
    accuracy: float
    num_prompts: int
    mean_counted_heads: float  # (layer, head) pairs per prompt that pass the induction filter S > T at the loss row
    mean_gold_mass: float  # gold-label mass at the loss row, averaged over prompts, layers and heads
    gold_mass: List[List[float]]  # [layer][head], averaged over prompts
    label_mass: List[List[float]]  # [layer][head]: mass on all demonstration labels
    predictions: List[int]
    seconds: float
    peak_memory_mb: float


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory on a CUDA device since the last reset, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def query_label_logits(model, batch, label_ids: torch.Tensor, **model_kwargs):
    """The paper's read-out for one collated batch: the query row's next-token logits over the label tokens.

    Args:
        model: an HF causal LM.
        batch: from `ICLCollator` (on the model's device): input_ids, attention_mask [B,N]; query_rows [B,1].
        label_ids: int64 [C], the read-out token of each class.
        **model_kwargs: passed on to the model call (e.g. abft=LabelSpec, output_attentions=True).

    Returns:
        (logits [B,C] in the model's dtype, the model's output).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logits_to_keep=batch["query_rows"], **model_kwargs)
    return out.logits[:, 0, label_ids], out


@torch.no_grad()
def label_logits(model, prompts: Sequence[ICLPrompt], label_token_ids: Sequence[int], pad_token_id: int,
                 batch_size: int = 16, progress: bool = False, desc: str = "label logits") -> torch.Tensor:
    """The read-out logits of every prompt (the same forward as `evaluate`, plain attention, no label masses).

    Args:
        model: an HF causal LM.
        prompts: P prompts; their query row is the last token.
        label_token_ids: C read-out token ids, in class order.
        pad_token_id: right padding of the batches.
        batch_size: prompts per forward pass.

    Returns:
        float32 [P, C] on the CPU: the query row's next-token logits over the label tokens.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collate = ICLCollator(pad_token_id)
    label_ids = torch.tensor(label_token_ids, device=device)
    rows = []
    for first in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        batch = {k: v.to(device) for k, v in collate(prompts[first:first + batch_size]).items()}
        rows.append(query_label_logits(model, batch, label_ids)[0].float().cpu())
    model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros(0, len(label_token_ids))


@torch.no_grad()
def evaluate(model, prompts: Sequence[ICLPrompt], label_token_ids: Sequence[int], pad_token_id: int,
             batch_size: int = 16, progress: bool = True, desc: str = "eval") -> EvalResult:
    """Accuracy and per-(layer, head) label attention of `model` on ICL prompts (paper, section 5: the read-out
    is the argmax over the label words' next-token logits at the query token).

    Args:
        model: a causal LM with the "abft" attention (`models.load_model`); put in eval mode for the call.
        prompts: `icl.ICLPrompt`s, one query row each. label_token_ids: the C label words' token ids, class order.
        pad_token_id: right-padding id. batch_size: prompts per forward pass (default 16).
        progress: show a tqdm bar, titled `desc`.

    Returns:
        EvalResult: accuracy over the prompts (read-out at the last token), counted heads per prompt (filter
        S > T) and gold-label and label masses per [layer][head] at each prompt's loss row, averaged over the prompts, predictions (class ids), seconds, peak memory (MiB).

    Raises:
        ValueError: from the model's "abft" attention or `abft_loss` when the prompts do not fit the model.
    """
    device = next(model.parameters()).device
    reset_peak_memory(device)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    collate = ICLCollator(pad_token_id)
    label_ids = torch.tensor(label_token_ids, device=device)
    num_classes = len(label_token_ids)
    predictions, correct, counted = [], 0, 0.0
    gold_sum = label_sum = None
    batches = range(0, len(prompts), batch_size)
    for first in tqdm(batches, desc=desc, disable=not progress):
        batch = {k: v.to(device) for k, v in collate(prompts[first:first + batch_size]).items()}
        out, _, info = abft_forward(model, batch, num_classes, logits_to_keep=batch["query_rows"])
        prediction = out.logits[:, 0, label_ids].argmax(-1)
        predictions += prediction.tolist()
        correct += int((prediction == batch["target_class"][:, 0]).sum())
        counted += float(info.counted_heads.sum())
        gold = info.gold_mass[..., 0].sum(1)  # [L,H], summed over the batch
        labels = info.label_mass[..., 0].sum(1)
        gold_sum = gold if gold_sum is None else gold_sum + gold
        label_sum = labels if label_sum is None else label_sum + labels
    model.train(was_training)
    n = len(prompts)
    gold_mass, label_mass = (gold_sum / n).cpu(), (label_sum / n).cpu()
    return EvalResult(accuracy=correct / n, num_prompts=n, mean_counted_heads=counted / n,
                      mean_gold_mass=float(gold_mass.mean()), gold_mass=gold_mass.tolist(),
                      label_mass=label_mass.tolist(), predictions=predictions,
                      seconds=time.perf_counter() - start, peak_memory_mb=peak_memory_mb(device))


def save_heatmap(path: Path, before: EvalResult, after: Optional[EvalResult] = None, title: str = "") -> Path:
    """PNG of the gold-label attention mass per (layer, head) at the query token: before, after, change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("before", torch.tensor(before.gold_mass))]
    if after is not None:
        panels += [("after ABFT", torch.tensor(after.gold_mass)),
                   ("after - before", torch.tensor(after.gold_mass) - torch.tensor(before.gold_mass))]
    layers, heads = panels[0][1].shape
    figure, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.6 * len(panels) + 0.25 * heads * len(panels),
                                                          1.5 + 0.18 * layers), squeeze=False)
    top = max(float(p.max()) for _, p in panels[:2])
    for ax, (name, values) in zip(axes[0], panels):
        if name == "after - before":
            bound = max(float(values.abs().max()), 1e-6)
            image = ax.imshow(values.numpy(), aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
        else:
            image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_title(name)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        figure.colorbar(image, ax=ax)
    return _save_figure(figure, path, title or "gold-label attention mass at the query token")


def save_dynamics(path: Path, log_history: List[dict], check=None, title: str = "") -> Path:
    """PNG of a training run's dynamics per optimiser step, like the paper's Fig. 5: counted heads per prompt
    (with the band of `training.count_check`), A, the ABFT loss and the gold-label mass at the query token.

    Args:
        path: the PNG to write. log_history: `trainer.state.log_history` of an ABFTTrainer (per step: step,
            counted_heads, A, abft_loss, gold_mass; an e2e run: e2e_loss and no A). check: a `training.CountCheck`
            to draw its band, or None.

    Returns:
        path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [entry for entry in log_history if "counted_heads" in entry]
    x = [entry["step"] for entry in steps]
    panels = [("counted_heads", "counted heads / prompt"), ("A", "A (used in the step)"), ("abft_loss", "ABFT loss"),
              ("e2e_loss", "E2E loss (cross-entropy)"), ("gold_mass", "gold-label mass")]
    panels = [(key, name) for key, name in panels if steps and key in steps[0]]  # an e2e run has no A
    figure, axes = plt.subplots(1, len(panels), figsize=(14, 3.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        ax.plot(x, [entry[key] for entry in steps], marker="o", markersize=3)
        if key == "counted_heads" and check is not None:
            ax.axhspan(check.band[0], check.band[1], color="tab:green", alpha=0.12, label="band")
            ax.axhline(check.start, color="tab:green", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save_figure(figure, path, title or "ABFT training dynamics")


def _save_figure(figure, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_report(path: Path, **sections) -> Path:
    """JSON report; EvalResult sections are written as dicts."""
    data = {name: asdict(value) if isinstance(value, EvalResult) else value for name, value in sections.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
