"""StaICC's standard ICL benchmark (the paper's protocol), rebuilt from its exported data files.

StaICC (hc495/StaICC, the library the ABFT paper built every input with) splits each dataset into a
calibration split (1024 examples), a demonstration split (4096; FP 512, TEE 3192) and a test split (512), and
runs each test item with 2 independently drawn sets of k = 4 demonstrations: 1024 prompts. The export (a
folder with `splits.json` and one `<dataset>.jsonl` per dataset; see its README.md) records StaICC's rows,
templates, splits and demonstration choices as data, from which `load_staicc` rebuilds the task and
`staicc_prompts` the prompts, in StaICC's order and, in "staicc" prompt style, byte for byte.

Here the training pool (`task.train`, ABFT's training prompts and contextual calibration) is the calibration
split, `task.demonstrations` the demonstration split, `task.test` the 512 test items and `task.prompt_plan`
the 1024 prompts' (demonstration positions, test position), prompt j being test position j mod 512.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .data import Example, ICLTask
from .prompts import ICLPrompt, PromptBuilder
from .templates import Template

STAICC_PREFIX = "staicc:"  # --dataset staicc:<name>
SPLITS_FILE = "splits.json"
DIAG_FILE = "diag.json"


@dataclass
class StaICCTask(ICLTask):
    """An ICLTask with StaICC's splits: train = calibration split, test = test split, plus:"""

    demonstrations: List[Example]  # the demonstration split, in StaICC's order
    prompt_plan: List[Tuple[Tuple[int, ...], int]]  # per prompt: (positions in demonstrations, position in test)
    # StaICC's template-consistency diagnostic (diag.json, when the export has it): its 9 templates, and per test
    # item (positions in demonstrations, position in test), the same for every template.
    consistency_templates: Optional[List[Template]] = None
    consistency_plan: Optional[List[Tuple[Tuple[int, ...], int]]] = None

    def prompt_examples(self, index: int) -> Tuple[List[Example], Example]:
        """(demonstrations, query) of StaICC prompt `index` (0 <= index < len(prompt_plan))."""
        demo_positions, test_position = self.prompt_plan[index]
        return [self.demonstrations[p] for p in demo_positions], self.test[test_position]


def is_staicc_source(source: str) -> bool:
    """True for a `--dataset` value of the form "staicc:<name>"."""
    return source.startswith(STAICC_PREFIX)


def staicc_template(template: dict, label_space: Sequence[str]) -> Template:
    """A `Template` from StaICC's template fields (instruction, input_text_prefixes, input_text_affixes,
    label_prefix, label_affix, query_prefix) and label space.

    Raises:
        ValueError: more than one input text (StaICC's multi-input tasks), or a label prefix without the trailing
            space that separates it from the label word (the `Template` writes that space itself).
    """
    prefixes, affixes = template["input_text_prefixes"], template["input_text_affixes"]
    if len(prefixes) != 1 or len(affixes) != 1:
        raise ValueError(f"StaICC template with {len(prefixes)} input texts: only single-input tasks are supported")
    label_prefix = template["label_prefix"]
    if not label_prefix.endswith(" "):
        raise ValueError(f"StaICC label_prefix {label_prefix!r} does not end with a space")
    return Template(input_prefix=prefixes[0], label_prefix=label_prefix[:-1], label_words=tuple(label_space),
                    instruction=template["instruction"], input_affix=affixes[0], label_affix=template["label_affix"],
                    query_prefix=template["query_prefix"])


def load_staicc(name: str, root: Optional[Union[str, Path]]) -> StaICCTask:
    """Load StaICC's standard-ICL benchmark for one dataset from the exported folder `root`.

    Args:
        name: the dataset, "staicc:<name>" or "<name>": StaICC's name (rotten_tomatoes, financial_phrasebank, sst5,
            trec, subjective, tweet_eval_emotion, tweet_eval_hate, hate_speech_18) or the paper's (MR, FP, SST5, TREC,
            SUBJ, TEE, TEH), case-insensitive.
        root: the folder holding splits.json and the datasets' JSONL files (rows {"text": str, "label": int}).

    Returns:
        A `StaICCTask` (name "staicc:<StaICC name>"): template and label words from splits.json, train = the
        calibration split (1024), demonstrations = the demonstration split, test = the test split (512),
        prompt_plan = the 1024 prompts' demonstration and test positions, in StaICC's order. Texts are kept as
        stored (not stripped), so that prompts are StaICC's bytes.

    Raises:
        ValueError: no root, a missing file, an unknown dataset, or files that contradict each other (row indices out of
            range, demo_rows that are not the demonstration split's rows at demo_pos, a prompt order that is not
            test position j mod n_test, a non-identity label mapping, noisy-channel or wrong-label settings).

    Source: StaICC `Normal` (k=4) benchmark, hc495/StaICC commit 9d13532 (the export's README.md).
    """
    if root is None:
        raise ValueError(f"dataset {name!r} needs the folder of StaICC's exported data (--staicc-root)")
    root = Path(root)
    splits_path = root / SPLITS_FILE
    if not splits_path.is_file():
        raise ValueError(f"staicc root {str(root)!r} has no {SPLITS_FILE}")
    datasets = json.loads(splits_path.read_text(encoding="utf-8"))["datasets"]
    key = name[len(STAICC_PREFIX):] if is_staicc_source(name) else name
    matches = [n for n, d in datasets.items() if key.lower() in (n.lower(), (d.get("paper_name") or n).lower())]
    if not matches:
        names = sorted(set(datasets) | {d["paper_name"] for d in datasets.values() if d.get("paper_name")})
        raise ValueError(f"dataset {key!r} is not in {splits_path}; known: {names}")
    staicc_name = matches[0]
    spec = datasets[staicc_name]
    where = f"{splits_path} [{staicc_name}]"

    label_space = spec["label_space"]
    if any(int(k) != v for k, v in spec["label_mapping"].items()) or len(spec["label_mapping"]) != len(label_space):
        raise ValueError(f"{where}: label_mapping {spec['label_mapping']} is not the identity over {label_space}")
    if spec.get("use_noisy_channel") or spec.get("label_wrong_rate", 0):
        raise ValueError(f"{where}: noisy-channel prompts and wrong demonstration labels are not supported")
    template = staicc_template(spec["template"], label_space)

    rows_path = root / spec["file"]
    if not rows_path.is_file():
        raise ValueError(f"{where}: rows file {str(rows_path)!r} does not exist")
    with rows_path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for number, row in enumerate(rows):
        if not isinstance(row.get("text"), str) or not 0 <= row.get("label", -1) < len(label_space):
            raise ValueError(f"{rows_path} row {number}: needs a string 'text' and a 'label' in "
                             f"[0, {len(label_space)}), got {str(row)[:100]}")

    def split(field: str) -> Tuple[List[int], List[Example]]:
        indices = spec[field]
        bad = [i for i in indices if not 0 <= i < len(rows)]
        if bad:
            raise ValueError(f"{where}: {field} holds rows {bad[:5]} outside the {len(rows)} rows of {rows_path.name}")
        return indices, [Example(rows[i]["text"], rows[i]["label"]) for i in indices]

    _, train = split("calibration_rows")
    demo_rows, demonstrations = split("demonstration_rows")
    test_rows, test = split("test_rows")
    plan = []
    for j, prompt in enumerate(spec["prompts"]):
        demo_pos, test_pos = tuple(prompt["demo_pos"]), prompt["test_pos"]
        if len(demo_pos) != spec["k"] or not all(0 <= p < len(demo_rows) for p in demo_pos):
            raise ValueError(f"{where}: prompt {j} has demo_pos {list(demo_pos)}, not k={spec['k']} positions in "
                             f"the demonstration split of {len(demo_rows)}")
        if [demo_rows[p] for p in demo_pos] != prompt["demo_rows"]:
            raise ValueError(f"{where}: prompt {j}'s demo_rows {prompt['demo_rows']} are not the demonstration "
                             f"split's rows at demo_pos {list(demo_pos)}")
        if test_pos != j % len(test_rows) or test_rows[test_pos] != prompt["test_row"]:
            raise ValueError(f"{where}: prompt {j} has test_pos {test_pos} / test_row {prompt['test_row']}, expected "
                             f"position {j % len(test_rows)} (row {test_rows[j % len(test_rows)]})")
        plan.append((demo_pos, test_pos))
    templates, consistency_plan = _template_consistency(root / DIAG_FILE, staicc_name, template, demo_rows, test_rows)
    return StaICCTask(name=STAICC_PREFIX + staicc_name, template=template, train=train, test=test,
                      demonstrations=demonstrations, prompt_plan=plan, consistency_templates=templates,
                      consistency_plan=consistency_plan)


def _template_consistency(path: Path, staicc_name: str, template: Template, demo_rows: List[int],
                          test_rows: List[int]):
    """(templates, plan) of StaICC's template-consistency diagnostic for one dataset from diag.json, or (None, None)
    when the export has no diag.json or no entry for it.

    Raises:
        ValueError: an entry that contradicts the splits (template 0 not the default template, a template with other
            label words, positions out of range, demonstration or test rows that are not the splits' rows there).
    """
    if not path.is_file():
        return None, None
    spec = json.loads(path.read_text(encoding="utf-8"))["template_consistency"]["datasets"].get(staicc_name)
    if spec is None:
        return None, None
    where = f"{path} [template_consistency.{staicc_name}]"
    templates = [staicc_template(t, t["label_space"]) for t in spec["templates"]]
    if templates[0] != template:
        raise ValueError(f"{where}: template 0 is not the dataset's default template")
    other_words = [t.label_words for t in templates if t.label_words != template.label_words]
    if other_words:
        raise ValueError(f"{where}: a template has label words {other_words[0]}, not the dataset's "
                         f"{template.label_words} (the gold labels are indices into them)")
    plan = []
    for j, prompt in enumerate(spec["prompts"]):
        demo_pos, test_pos = tuple(prompt["demo_pos"]), prompt["test_pos"]
        if not all(0 <= p < len(demo_rows) for p in demo_pos) or not 0 <= test_pos < len(test_rows) \
                or [demo_rows[p] for p in demo_pos] != prompt["demo_rows"] or test_rows[test_pos] != prompt["test_row"]:
            raise ValueError(f"{where}: prompt {j} ({prompt}) does not fit the demonstration split of "
                             f"{len(demo_rows)} and the test split")
        plan.append((demo_pos, test_pos))
    return templates, plan


def staicc_prompts(builder: PromptBuilder, task: StaICCTask, num_prompts: Optional[int] = None) -> List[ICLPrompt]:
    """The first `num_prompts` (default all 1024) of StaICC's test prompts, in its order, built by `builder`.

    Args:
        builder: a PromptBuilder for `task.template` (style "staicc" gives StaICC's prompts byte for byte).
        task: from `load_staicc`.
        num_prompts: how many, from the start (prompt j is test item j mod 512, so 512 covers every test item once).

    Returns:
        ICLPrompts whose `gold` is the test item's class id.

    Raises:
        ValueError: a builder for another template, `num_prompts` outside [1, len(task.prompt_plan)], or a label word
            that does not tokenize to its label token (from the builder).
    """
    if builder.template != task.template:
        raise ValueError(f"builder has template {builder.template}, not the task's {task.template}")
    total = len(task.prompt_plan)
    count = total if num_prompts is None else num_prompts
    if not 1 <= count <= total:
        raise ValueError(f"num_prompts must be in [1, {total}], got {num_prompts}")
    return [builder.build(*task.prompt_examples(j)) for j in range(count)]
