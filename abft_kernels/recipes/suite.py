"""`abft suite`: the paper's evaluation instruments on any model and dataset `abft train` takes (issue 14).

On the same held-out prompts as `abft train/eval` (workflow.held_out_prompts), each part a function of a
`SuiteRun` that returns a dict for report.json, in this order (`--parts` picks a subset):

1. "table" (paper Table 1): vanilla ICL, contextual calibration (calibration.py), ABFT (train, then evaluate) and
   the end-to-end baseline (train --objective e2e, LoRA, same data and steps, then evaluate).
2. "ood" (paper Table 2): the vanilla, ABFT- and E2E-trained models on the held-out prompts of a second task.
3. "demo-consistency" (paper §6, robustness): per query, predictions under `consistency_sets` independently drawn
   demonstration sets; consistency = share of the most frequent prediction, averaged over queries.
4. "template-consistency" (paper §6, robustness): per query, predictions under StaICC's 9 templates (an L9
   orthogonal array over instruction, input prefix, label prefix and label affix) with the same demonstrations;
   consistency as above. StaICC tasks with its diag.json take its templates, test items and demonstrations.
5. "unseen-label" (paper Fig. 3, unbiasedness): accuracy with demonstrations that never carry the query's gold
   label, against 0-shot and randomly drawn demonstrations.
6. "mode-connectivity" (paper Eq. 2): accuracy of theta0 + lambda_E (thetaE - theta0) + lambda_A (thetaA - theta0) on
   a grid of (lambda_E, lambda_A), as a contour plot.

Not built yet: the seven-dataset results. The trained models are trained once, on first use, and kept for the later parts.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .icl import Example, ICLPrompt, PromptBuilder, StaICCTask
from .icl.data import template_factors
from .icl.templates import template_variants
from .models import DEFAULT_MODEL
from .settings import PAPER, ABFTSettings, given_settings, preset_epilog
from .workflow import held_out_prompts, load_workflow_task, setup_device, task_template, train_on_task

PART_NAMES = ("table", "ood", "demo-consistency", "template-consistency", "unseen-label", "mode-connectivity")
# Second task of the "ood" part when --ood-dataset is not given (the paper's Table 2 pairs sentiment and SUBJ).
DEFAULT_OOD = {"rt-sentiment": "rt-subj", "rt-subj": "rt-sentiment", "mr": "subj", "subj": "mr",
               "staicc:mr": "staicc:subj", "staicc:subj": "staicc:mr"}
# Seeds, offset from --seed: content-free demonstration sets, consistency sets, unseen-label / random demonstrations.
CALIBRATION_SEED_OFFSET, CONSISTENCY_SEED_OFFSET, UNSEEN_SEED_OFFSET, TEMPLATE_SEED_OFFSET = 3, 4, 5, 6


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class SuiteSettings(ABFTSettings):
    """ABFTSettings (data, training of ABFT and of the E2E baseline) plus the suite's own sizes."""

    parts: str = field(default=",".join(PART_NAMES), metadata=_help(
        f"comma-separated parts to run, in this order: {', '.join(PART_NAMES)}"))
    ood_dataset: Optional[str] = field(default=None, metadata=_help(
        "second task of the ood part (its own default template); default: " +
        ", ".join(f"{a} -> {b}" for a, b in DEFAULT_OOD.items()) + "; other datasets skip the part unless given"))
    e2e: bool = field(default=True, metadata=_help(
        "train and evaluate the end-to-end baseline (--no_e2e leaves it out: no E2E column, and the "
        "mode-connectivity part, which needs it, is skipped)"))
    e2e_lr: Optional[float] = field(default=None, metadata=_help(
        "learning rate of the E2E baseline's LoRA training (default: --lr)"))
    calibration_sets: int = field(default=128, metadata=_help(
        "demonstration sets of the content-free prompts (x 3 queries) of contextual calibration (StaICC: 128)"))
    consistency_queries: int = field(default=64, metadata=_help("queries of the demonstration-consistency part"))
    consistency_sets: int = field(default=8, metadata=_help("demonstration sets per query (the paper: 8)"))
    template_queries: int = field(default=100, metadata=_help(
        "queries of the template-consistency part, each under 9 templates (StaICC: 100)"))
    unseen_queries: int = field(default=256, metadata=_help("queries of the unseen-label part"))
    connectivity_lambdas: str = field(default="0,0.25,0.5,0.75,1", metadata=_help(
        "comma-separated values of lambda_E and of lambda_A of the mode-connectivity grid"))
    connectivity_prompts: int = field(default=64, metadata=_help(
        "held-out prompts evaluated at each point of the mode-connectivity grid (the first ones)"))


SUITE = SuiteSettings()
# `abft suite --quick`: a smoke run (minutes on 2 CPU cores with the built-in model); lr 5e-4 (2 steps move little).
SUITE_QUICK = replace(SUITE, lr=5e-4, steps=2, prompts_per_step=4, micro_batch=4, train_prompts=8, eval_prompts=8,
                      max_chars=100, calibration_sets=4, consistency_queries=4, consistency_sets=3, template_queries=3, unseen_queries=4,
                      connectivity_lambdas="0,1", connectivity_prompts=4)


def parse_parts(parts: str) -> List[str]:
    """The parts named in `parts` (comma-separated), in the suite's order.

    Raises:
        ValueError: an unknown part or none.
    """
    names = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in PART_NAMES]
    if unknown or not names:
        raise ValueError(f"--parts must name some of {PART_NAMES}, got {parts!r}")
    return [p for p in PART_NAMES if p in names]


def demonstration_pool(task) -> List[Example]:
    """Where test prompts draw demonstrations from: StaICC's demonstration split, else the training pool."""
    return task.demonstrations if isinstance(task, StaICCTask) else task.train


def read_out(model, prompts: Sequence[ICLPrompt], label_token_ids: Sequence[int], pad_token_id: int,
             batch_size: int) -> List[int]:
    """The paper's read-out (argmax over the label words' logits at the query token) of every prompt."""
    from .evaluation import label_logits

    return label_logits(model, prompts, label_token_ids, pad_token_id, batch_size).argmax(-1).tolist()


def accuracy(predictions: Sequence[int], prompts: Sequence[ICLPrompt]) -> float:
    return sum(p == q.gold for p, q in zip(predictions, prompts)) / len(prompts)


def consistency_prompts(builder: PromptBuilder, pool: Sequence[Example], queries: Sequence[Example], k: int,
                        num_sets: int, seed: int) -> List[List[ICLPrompt]]:
    """Per query, `num_sets` prompts whose k demonstrations are drawn independently and uniformly from `pool`
    (calibration.sample_demonstration_sets, one draw sequence for all queries).

    Raises:
        ValueError: k not in [1, len(pool)].
    """
    from .calibration import sample_demonstration_sets

    sets = sample_demonstration_sets(pool, k, num_sets * len(queries), seed)
    return [[builder.build(demos, query) for demos in sets[i * num_sets:(i + 1) * num_sets]]
            for i, query in enumerate(queries)]


def consistency(predictions: Sequence[Sequence[int]]) -> float:
    """Mean over queries of the share of the most frequent prediction among the query's demonstration sets
    (in [1/C, 1] for C classes)."""
    return sum(Counter(row).most_common(1)[0][1] / len(row) for row in predictions) / len(predictions)


def unseen_label_prompts(builder: PromptBuilder, pool: Sequence[Example], queries: Sequence[Example], k: int,
                         seed: int) -> Dict[str, List[ICLPrompt]]:
    """The three prompt kinds of the paper's Fig. 3, one prompt per query each:
    "zero_shot" (no demonstrations), "random" (k drawn uniformly from `pool`) and "unseen_label" (k drawn uniformly
    from the examples of `pool` whose label is not the query's).

    Raises:
        ValueError: fewer than k examples in the pool (or fewer than k outside some query's label).
    """
    rng = random.Random(seed)
    by_label: Dict[int, List[Example]] = {}
    for example in pool:
        by_label.setdefault(example.label, []).append(example)
    kinds = {"zero_shot": [], "random": [], "unseen_label": []}
    for query in queries:
        others = [e for label, examples in by_label.items() if label != query.label for e in examples]
        if len(others) < k or len(pool) < k:
            raise ValueError(f"unseen-label prompts need k={k} demonstrations without the label {query.label}; "
                             f"the pool has {len(others)}")
        kinds["zero_shot"].append(builder.build([], query))
        kinds["random"].append(builder.build(rng.sample(list(pool), k), query))
        kinds["unseen_label"].append(builder.build(rng.sample(others, k), query))
    return kinds


class SuiteRun:
    """What the parts share: settings, tokenizer, task, held-out prompts, and the models (vanilla, then "abft" and
    "e2e" trained on first use with `workflow.train_on_task`, kept for the later parts)."""

    def __init__(self, settings: SuiteSettings, output_dir: Path, device: torch.device):
        from .models import load_model

        self.settings, self.output_dir, self.device = settings, output_dir, device
        model, self.tokenizer = load_model(settings.model, device=device, load_in_4bit=settings.load_in_4bit)
        self.models = {"vanilla": model}
        self.training: Dict[str, dict] = {}
        self.held_out_predictions: Dict[str, List[int]] = {}  # per model, on self.prompts (filled by part_table)
        self.task = load_workflow_task(settings, task_template(settings))
        self.prompts: List[ICLPrompt] = held_out_prompts(self.tokenizer, self.task, settings)[1]
        self.builder = PromptBuilder(self.tokenizer, self.task.template, style=settings.prompt_style,
                                     loss_row=settings.loss_row)
        self.trained = ("abft", "e2e") if settings.e2e else ("abft",)  # the models the parts train

    def model(self, name: str):
        """The model "vanilla", "abft" or "e2e" (trained now if not yet: a fresh copy of the base model)."""
        if name not in self.models:
            from .models import load_model

            settings = self.settings
            if name == "e2e":
                settings = replace(settings, objective="e2e", lr=settings.e2e_lr or settings.lr)
            model, _ = load_model(settings.model, device=self.device, load_in_4bit=settings.load_in_4bit)
            trainer, seconds, peak = train_on_task(model, self.tokenizer, self.task, settings,
                                                   str(self.output_dir / name))
            self.training[name] = {"seconds": seconds, "peak_memory_mb": peak, "objective": settings.objective,
                                   "lr": settings.lr, "log": trainer.state.log_history}
            if settings.objective == "abft":  # the check `abft train` makes: zero, collapsed or exploded counts
                from .training import print_count_check

                check = print_count_check(trainer.state.log_history)
                self.training[name].update(count_check=asdict(check), warnings=check.warnings)
            self.models[name] = model
        return self.models[name]

    def read_out(self, name: str, prompts: Sequence[ICLPrompt], label_token_ids=None) -> List[int]:
        return read_out(self.model(name), prompts, label_token_ids or self.builder.label_token_ids,
                        self.tokenizer.pad_token_id, self.settings.batch_size)

    def predictions(self, name: str) -> List[int]:
        """Model `name`'s predictions on the held-out prompts (part_table's when it ran: one forward each)."""
        if name not in self.held_out_predictions:
            self.held_out_predictions[name] = self.read_out(name, self.prompts)
        return self.held_out_predictions[name]

    def queries(self, count: int) -> List[Example]:
        return list(self.task.test[:count])


def calibration_prompts(builder: PromptBuilder, task, settings: SuiteSettings) -> List[ICLPrompt]:
    """The content-free prompts of contextual calibration: `calibration_sets` demonstration sets from the training
    pool (as StaICC's calibration split), each with the 3 content-free queries."""
    from .calibration import content_free_prompts, sample_demonstration_sets

    return content_free_prompts(builder, sample_demonstration_sets(
        task.train, settings.k, settings.calibration_sets, settings.seed + CALIBRATION_SEED_OFFSET))


def part_table(run: SuiteRun) -> dict:
    """Table 1: vanilla ICL, contextual calibration, ABFT and E2E accuracy (with counted heads and gold-label
    mass from `evaluation.evaluate`) on the held-out prompts."""
    from .calibration import contextual_calibration
    from .evaluation import evaluate

    pad = run.tokenizer.pad_token_id
    result = {"num_prompts": len(run.prompts)}
    result["vanilla"] = asdict(evaluate(run.model("vanilla"), run.prompts, run.builder.label_token_ids, pad,
                                        run.settings.batch_size, desc="vanilla"))
    calibration = contextual_calibration(run.model("vanilla"), run.prompts,
                                         calibration_prompts(run.builder, run.task, run.settings),
                                         run.builder.label_token_ids, pad, run.settings.batch_size)
    result["calibration"] = asdict(calibration)
    for name in run.trained:
        result[name] = asdict(evaluate(run.model(name), run.prompts, run.builder.label_token_ids, pad,
                                       run.settings.batch_size, desc=name))
    for name in ("vanilla",) + run.trained:
        run.held_out_predictions[name] = result[name]["predictions"]
    return result


def part_ood(run: SuiteRun) -> dict:
    """Table 2: accuracy of the vanilla, ABFT- and E2E-trained models on the held-out prompts of the training task
    (in-domain) and of `ood_dataset` (out-of-domain, with its own default template)."""
    settings = run.settings
    ood = settings.ood_dataset or DEFAULT_OOD.get(settings.dataset)
    if ood is None:
        return {"skipped": f"no --ood-dataset for {settings.dataset!r}"}
    ood_settings = replace(settings, dataset=ood)
    ood_task = load_workflow_task(ood_settings, None)
    ood_prompts = held_out_prompts(run.tokenizer, ood_task, ood_settings)[1]
    ood_labels = PromptBuilder(run.tokenizer, ood_task.template, style=settings.prompt_style,
                               loss_row=settings.loss_row).label_token_ids
    result = {"dataset": settings.dataset, "ood_dataset": ood, "num_prompts": len(run.prompts),
              "num_ood_prompts": len(ood_prompts), "in_domain": {}, "out_of_domain": {}}
    for name in ("vanilla",) + run.trained:
        result["in_domain"][name] = accuracy(run.predictions(name), run.prompts)
        result["out_of_domain"][name] = accuracy(run.read_out(name, ood_prompts, ood_labels), ood_prompts)
    return result


def part_demo_consistency(run: SuiteRun) -> dict:
    """Demonstration consistency of vanilla, ABFT (and E2E if trained) over the same demonstration sets."""
    settings = run.settings
    queries = run.queries(settings.consistency_queries)
    grid = consistency_prompts(run.builder, demonstration_pool(run.task), queries, settings.k,
                               settings.consistency_sets, settings.seed + CONSISTENCY_SEED_OFFSET)
    flat = [p for row in grid for p in row]
    result = {"num_queries": len(queries), "num_sets": settings.consistency_sets,
              "num_classes": run.task.template.num_classes, "models": {}}
    for name in ["vanilla", "abft"] + (["e2e"] if "e2e" in run.models else []):
        predictions = run.read_out(name, flat)
        rows = [predictions[i:i + settings.consistency_sets] for i in range(0, len(flat), settings.consistency_sets)]
        result["models"][name] = {"consistency": consistency(rows), "accuracy": accuracy(predictions, flat),
                                  "predictions": rows}
    return result


def template_consistency_items(run: SuiteRun) -> tuple:
    """(templates, [(demonstrations, query)], source) of the template-consistency part: StaICC's own diagnostic
    when the task carries it (diag.json), else the task's default template varied by StaICC's options for its
    dataset (`template_variants`) with one demonstration set per query drawn from the pool.

    Raises:
        ValueError: a dataset without StaICC's template options (`icl.data.template_factors`), or a custom template.
    """
    task, settings = run.task, run.settings
    count = settings.template_queries
    if isinstance(task, StaICCTask) and task.consistency_plan is not None:
        items = [([task.demonstrations[p] for p in demo_positions], task.test[test_position])
                 for demo_positions, test_position in task.consistency_plan[:count]]
        return task.consistency_templates, items, "StaICC's diag.json: its templates, test items and demonstrations"
    from .calibration import sample_demonstration_sets

    templates = template_variants(task.template, template_factors(task))
    queries = run.queries(count)
    sets = sample_demonstration_sets(demonstration_pool(task), settings.k, len(queries),
                                     settings.seed + TEMPLATE_SEED_OFFSET)
    return templates, list(zip(sets, queries)), "StaICC's template options for the dataset; demonstrations drawn"


def part_template_consistency(run: SuiteRun) -> dict:
    """Template consistency of vanilla, ABFT (and E2E if trained): per query the same demonstrations under each
    template, each template read out on its own label tokens."""
    try:
        templates, items, source = template_consistency_items(run)
    except ValueError as error:  # no known alternative templates for this dataset: said in the report, not guessed
        return {"skipped": str(error)}
    builders = [PromptBuilder(run.tokenizer, t, style=run.settings.prompt_style, loss_row=run.settings.loss_row)
                for t in templates]
    grids = [[b.build(demos, query) for demos, query in items] for b in builders]  # [template][query]
    result = {"num_queries": len(items), "num_templates": len(templates), "source": source,
              "templates": [asdict(t) for t in templates], "models": {}}
    for name in ["vanilla", "abft"] + (["e2e"] if "e2e" in run.models else []):
        per_template = [run.read_out(name, prompts, b.label_token_ids) for b, prompts in zip(builders, grids)]
        result["models"][name] = {
            "consistency": consistency([list(row) for row in zip(*per_template)]),
            "accuracy_per_template": [accuracy(p, prompts) for p, prompts in zip(per_template, grids)],
            "predictions": [list(row) for row in zip(*per_template)]}
    return result


def part_unseen_label(run: SuiteRun) -> dict:
    """Accuracy of vanilla, ABFT (and E2E if trained) with unseen-label, random and no demonstrations."""
    settings = run.settings
    queries = run.queries(settings.unseen_queries)
    kinds = unseen_label_prompts(run.builder, demonstration_pool(run.task), queries, settings.k,
                                 settings.seed + UNSEEN_SEED_OFFSET)
    result = {"num_queries": len(queries), "golds": [q.label for q in queries],
              "demonstration_labels": {kind: [p.label_classes for p in prompts] for kind, prompts in kinds.items()},
              "accuracy": {}}
    for name in ["vanilla", "abft"] + (["e2e"] if "e2e" in run.models else []):
        result["accuracy"][name] = {kind: accuracy(run.read_out(name, prompts), prompts)
                                    for kind, prompts in kinds.items()}
    return result


def effective_weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """"<module>.weight" / "<module>.bias" -> the tensor each layer applies, detached: parametrizations applied
    (trainable_qk's frozen features) and LoRA adapters added to their base layer (peft's delta weights), so that
    models trained either way compare parameter by parameter with the base model."""
    from peft.tuners.lora import LoraLayer

    lora_layers = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    weights = {}
    for name, module in model.named_modules():
        if any(name.startswith(layer + ".") for layer in lora_layers):
            continue  # the adapters and the base layer inside a LoRA layer: folded into the layer below
        if name in lora_layers:
            base = module.get_base_layer()
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
            weights[f"{name}.weight"] = (base.weight + delta).detach()
            if getattr(base, "bias", None) is not None:
                weights[f"{name}.bias"] = base.bias.detach()
            continue
        for tensor_name in ("weight", "bias"):
            tensor = getattr(module, tensor_name, None)
            if isinstance(tensor, torch.Tensor):
                weights[f"{name}.{tensor_name}"] = tensor.detach()
    return weights


def parse_lambdas(text: str) -> List[float]:
    """--connectivity-lambdas -> floats.

    Raises:
        ValueError: not a comma-separated list of at least two finite numbers in increasing order.
    """
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) < 2 or not all(math.isfinite(v) for v in values) or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"--connectivity-lambdas must be at least two finite comma-separated numbers in increasing "
                         f"order, got {text!r}")
    return values


def part_mode_connectivity(run: SuiteRun) -> dict:
    """Accuracy on the first `connectivity_prompts` held-out prompts of theta0 + lambda_E (thetaE - theta0) +
    lambda_A (thetaA - theta0) for every (lambda_E, lambda_A) of the grid, and mode_connectivity.png (contours).

    Source: ABFT paper (arXiv 2505.14233), Eq. 2 and its mode-connectivity figure. theta0 is the base model, thetaA
    the ABFT-trained and thetaE the E2E-trained one (LoRA adapters merged into their layers)."""
    from .models import load_model

    settings = run.settings
    if not settings.e2e:
        return {"skipped": "it needs the E2E model (--no_e2e)"}
    lambdas = parse_lambdas(settings.connectivity_lambdas)
    base = effective_weights(run.model("vanilla"))
    trained = {name: effective_weights(run.model(name)) for name in ("abft", "e2e")}
    changed = [n for n in base if any(not torch.equal(w[n], base[n]) for w in trained.values())]
    deltas = {name: {n: trained[name][n] - base[n] for n in changed} for name in trained}
    scratch, _ = load_model(settings.model, device=run.device, load_in_4bit=settings.load_in_4bit)
    tensors = effective_weights(scratch)  # detached views of its parameters: copy_ writes into the model
    prompts = run.prompts[:settings.connectivity_prompts]
    grid = []
    for lambda_e in lambdas:
        row = []
        for lambda_a in lambdas:
            with torch.no_grad():
                for n in changed:
                    tensors[n].copy_(base[n] + lambda_e * deltas["e2e"][n] + lambda_a * deltas["abft"][n])
            row.append(accuracy(read_out(scratch, prompts, run.builder.label_token_ids, run.tokenizer.pad_token_id,
                                         settings.batch_size), prompts))
        grid.append(row)
    result = {"lambdas": lambdas, "num_prompts": len(prompts), "changed_tensors": changed,
              "accuracy": grid}  # accuracy[i][j]: lambda_E = lambdas[i], lambda_A = lambdas[j]
    result["plot"] = str(save_connectivity_contour(run.output_dir / "mode_connectivity.png", result, settings))
    return result


def save_connectivity_contour(path: Path, result: dict, settings) -> Path:
    """PNG: accuracy contours over (lambda_A, lambda_E), the base, ABFT and E2E models marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluation import _save_figure

    lambdas, accuracy_grid = result["lambdas"], result["accuracy"]
    figure, ax = plt.subplots(figsize=(4.6, 3.8))
    contours = ax.contourf(lambdas, lambdas, accuracy_grid, levels=12, cmap="viridis")
    figure.colorbar(contours, ax=ax, label="accuracy")
    for (x, y), name in (((0, 0), "base"), ((1, 0), "ABFT"), ((0, 1), "E2E")):  # labels inward from the corner
        ax.plot(x, y, "w.", clip_on=False)
        ax.annotate(name, (x, y), color="white", xytext=(-3 if x else 3, -3 if y else 3), textcoords="offset points",
                    ha="right" if x else "left", va="top" if y else "bottom")
    ax.set_xlabel("lambda_A (ABFT direction)")
    ax.set_ylabel("lambda_E (E2E direction)")
    return _save_figure(figure, path, f"mode connectivity, {result['num_prompts']} prompts of {settings.dataset}")


PARTS: Dict[str, Callable[[SuiteRun], dict]] = {
    "table": part_table, "ood": part_ood, "demo-consistency": part_demo_consistency,
    "template-consistency": part_template_consistency, "unseen-label": part_unseen_label,
    "mode-connectivity": part_mode_connectivity}


def run_parts(settings: SuiteSettings, output_dir: Path, device: torch.device) -> dict:
    """Run the parts of `settings.parts` in order; returns the report (settings, one section per part, training
    logs, seconds per part), written to output_dir/report.json after every part, so a run stopped midway keeps
    the parts it finished (its seconds have no "total" yet), and once more with the total time."""
    from .evaluation import save_report

    parts = parse_parts(settings.parts)
    if "mode-connectivity" in parts:
        parse_lambdas(settings.connectivity_lambdas)  # before any training
        if settings.load_in_4bit:
            raise ValueError("the mode-connectivity part interpolates full-precision weights; --load-in-4bit packs "
                             "them: leave the part out (--parts) or the option")
    if settings.objective != "abft":
        raise ValueError(f"abft suite trains both objectives itself (ABFT, then E2E); --objective "
                         f"{settings.objective!r} is not an option of the suite")
    start = time.perf_counter()
    run = SuiteRun(settings, output_dir, device)
    report = {"settings": asdict(settings), "parts": parts, "seconds": {"setup": time.perf_counter() - start}}
    for name in parts:
        part_start = time.perf_counter()
        report[name] = PARTS[name](run)
        report["seconds"][name] = time.perf_counter() - part_start
        report["training"] = run.training
        save_report(output_dir / "report.json", **report)
    report["seconds"]["total"] = time.perf_counter() - start
    save_report(output_dir / "report.json", **report)
    return report


def format_report(report: dict) -> str:
    """The console table: one column per method, one row per measure of the parts that ran."""
    s = report["settings"]
    methods = ("vanilla", "calibration", "abft", "e2e")
    rows = []
    table = report.get("table")
    if table:
        rows.append(("accuracy", [table[m]["accuracy"] if m in table else None for m in methods], "{:.3f}"))
        rows.append(("counted heads / prompt", [table.get(m, {}).get("mean_counted_heads") for m in methods],
                     "{:.1f}"))
        rows.append(("gold-label mass", [table.get(m, {}).get("mean_gold_mass") for m in methods], "{:.4f}"))
    ood = report.get("ood")
    if ood and "skipped" not in ood:
        for key, dataset in (("in_domain", ood["dataset"]), ("out_of_domain", ood["ood_dataset"])):
            rows.append((f"{key.replace('_', '-')} ({dataset})",
                         [ood[key].get(m) for m in methods], "{:.3f}"))
    demo = report.get("demo-consistency")
    if demo:
        rows.append((f"demo consistency ({demo['num_sets']} sets)",
                     [demo["models"].get(m, {}).get("consistency") for m in methods], "{:.3f}"))
    templates = report.get("template-consistency")
    if templates and "skipped" not in templates:
        rows.append((f"template consistency ({templates['num_templates']})",
                     [templates["models"].get(m, {}).get("consistency") for m in methods], "{:.3f}"))
    unseen = report.get("unseen-label")
    if unseen:
        for kind in ("zero_shot", "random", "unseen_label"):
            rows.append((f"acc. {kind.replace('_', '-')} demos",
                         [unseen["accuracy"].get(m, {}).get(kind) for m in methods], "{:.3f}"))
    connectivity = report.get("mode-connectivity")
    if connectivity and "skipped" not in connectivity:
        lambdas, grid = connectivity["lambdas"], connectivity["accuracy"]
        best = max((grid[i][j], lambdas[i], lambdas[j]) for i in range(len(lambdas)) for j in range(len(lambdas)))
        extra_lines = [f"mode connectivity ({connectivity['num_prompts']} prompts): best accuracy {best[0]:.3f} at "
                       f"lambda_E={best[1]:g}, lambda_A={best[2]:g}; plot {connectivity['plot']}"]
    else:
        extra_lines = []
    title = (f"abft suite: {s['model'] or DEFAULT_MODEL} on {s['dataset']} (k={s['k']}, "
             f"{(table or {}).get('num_prompts', s['eval_prompts'])} held-out prompts, seed {s['seed']}, "
             f"{s['steps']} steps x {s['prompts_per_step']} prompts, {s.get('prompt_style', 'staicc')} style, "
             f"loss row {s.get('loss_row', 'read-out')}"  # reports before the loss_row setting: the read-out row
             f"{', a gold demonstration in every training prompt' if s.get('gold_demonstration') else ''})")
    lines = [title, f"{'':34}" + "".join(f"{m:>13}" for m in methods)]
    for name, values, fmt in rows:
        lines.append(f"{name:34}" + "".join(f"{fmt.format(v) if v is not None else '-':>13}" for v in values))
    for name in ("ood", "template-consistency", "mode-connectivity"):
        if "skipped" in (report.get(name) or {}):
            lines.append(f"{name}: skipped ({report[name]['skipped']})")
    lines += extra_lines
    lines += [f"WARNING ({name} training): {warning}"
              for name, run in report.get("training", {}).items() for warning in run.get("warnings", [])]
    lines.append("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def save_accuracy_bars(path: Path, report: dict) -> Path:
    """PNG: grouped bars, one group per accuracy-like measure, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluation import _save_figure

    methods = ("vanilla", "calibration", "abft", "e2e")
    groups = []
    if report.get("table"):
        groups.append(("held-out accuracy", {m: report["table"][m]["accuracy"] for m in methods
                                             if m in report["table"]}))
    ood = report.get("ood")
    if ood and "skipped" not in ood:
        groups.append((f"OOD ({ood['ood_dataset']})", ood["out_of_domain"]))
    if report.get("demo-consistency"):
        groups.append(("demo consistency", {m: v["consistency"]
                                            for m, v in report["demo-consistency"]["models"].items()}))
    if report.get("template-consistency") and "skipped" not in report["template-consistency"]:
        groups.append(("template consistency", {m: v["consistency"]
                                                for m, v in report["template-consistency"]["models"].items()}))
    if report.get("unseen-label"):
        for kind in ("zero_shot", "random", "unseen_label"):
            groups.append((kind.replace("_", "-"), {m: v[kind] for m, v in report["unseen-label"]["accuracy"].items()}))
    figure, ax = plt.subplots(figsize=(2 + 1.6 * max(len(groups), 1), 3.6))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [g + (i - 1.5) * width for g, (_, values) in enumerate(groups) if method in values]
        ys = [values[method] for _, values in groups if method in values]
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], rotation=15)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    s = report["settings"]
    return _save_figure(figure, path, f"abft suite: {s['model'] or DEFAULT_MODEL} on {s['dataset']}")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Finish the `abft suite` parser that HfArgumentParser generated from SuiteSettings: every settings option
    defaults to None (the preset, SUITE or SUITE_QUICK, fills the rest), plus the run options."""
    parser.set_defaults(**{f.name: None for f in fields(SuiteSettings)})
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = preset_epilog([("suite", SUITE), ("suite --quick", SUITE_QUICK)])
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="runs/suite")
    run.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--quick", action="store_true", help="smoke-size run (SUITE_QUICK)")


def run_suite(args: argparse.Namespace) -> dict:
    """`abft suite`: the parts, a console table, report.json and accuracy.png in --output-dir; returns the report."""
    settings = replace(SUITE_QUICK if args.quick else SUITE, **given_settings(args, SuiteSettings))
    parse_parts(settings.parts)  # before loading anything
    device = setup_device(args.device, args.threads)
    out = Path(args.output_dir)
    report = run_parts(settings, out, device)
    save_accuracy_bars(out / "accuracy.png", report)
    print("\n" + format_report(report) + f"\n\nreport: {out / 'report.json'}  plot: {out / 'accuracy.png'}")
    return report
