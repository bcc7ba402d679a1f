"""StaICC's template-consistency templates: the L9 orthogonal array over four factors, the paper datasets' options
(equal to StaICC's diag.json, checked when ../shared is there), and refusals for templates without options."""
import itertools
import json
from pathlib import Path

import pytest

from abft_kernels.recipes.icl import PAPER_TASKS, ICLTask
from abft_kernels.recipes.icl.data import BUILTIN_PAPER_TASK, template_factors
from abft_kernels.recipes.icl.templates import ORTHOGONAL_L9, template_variants

DIAG = Path(__file__).resolve().parents[3] / "shared" / "data" / "staicc" / "diag.json"
STAICC_NAMES = {"rotten_tomatoes": "mr", "financial_phrasebank": "fp", "sst5": "sst5", "trec": "trec",
                "subjective": "subj", "tweet_eval_emotion": "tee", "tweet_eval_hate": "teh"}


def test_orthogonal_array_covers_every_pair_of_options_once():
    for a, b in itertools.combinations(range(4), 2):
        assert sorted((row[a], row[b]) for row in ORTHOGONAL_L9) == list(itertools.product(range(3), repeat=2))


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
def test_variants_of_each_paper_template(name):
    task = PAPER_TASKS[name]
    variants = template_variants(task.template, task.factors)
    assert len(variants) == 9 and variants[0] == task.template and len(set(variants)) == 9
    factors = task.factors
    for variant, (a, b, c, d) in zip(variants, ORTHOGONAL_L9):
        assert (variant.instruction, variant.input_prefix, variant.label_prefix, variant.label_affix) == (
            factors.instructions[a], factors.input_prefixes[b], factors.label_prefixes[c], factors.label_affixes[d])
        assert variant.label_words == task.template.label_words


def test_a_custom_template_or_dataset_has_no_variants():
    mr = PAPER_TASKS["mr"]
    with pytest.raises(ValueError, match="a custom template has no variants"):
        template_variants(PAPER_TASKS["subj"].template, mr.factors)
    with pytest.raises(ValueError, match="dataset 'my.csv' has none"):
        template_factors(ICLTask("my.csv", mr.template, [], []))
    for builtin, paper in BUILTIN_PAPER_TASK.items():
        assert template_factors(ICLTask(builtin, PAPER_TASKS[paper].template, [], [])) == PAPER_TASKS[paper].factors


@pytest.mark.skipif(not DIAG.is_file(), reason="../shared/data/staicc/diag.json is not here (a clone has none)")
def test_options_equal_staicc_diag():
    datasets = json.loads(DIAG.read_text())["template_consistency"]["datasets"]
    for staicc_name, paper in STAICC_NAMES.items():
        options, factors = datasets[staicc_name]["alternate_template"], PAPER_TASKS[paper].factors
        assert tuple(options["instruction"]) == factors.instructions
        assert tuple(p for [p] in options["input_text_prefixes"]) == factors.input_prefixes
        assert tuple(p[:-1] for p in options["label_prefix"]) == factors.label_prefixes
        assert tuple(options["label_affix"]) == factors.label_affixes
