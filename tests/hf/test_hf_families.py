"""The family matrix: every causal-LM model type that the installed transformers can build as a tiny random
model, with left- and right-padded rows, is either PASS (label masses against eager attention weights summed per
class, logits without labels against eager, Q/K gradients of abft_loss against the eager-built loss) or REFUSED
with a ValueError raised by abft_kernels that says why; anything else fails. Model types without a tiny model
(a default config that does not build, a missing optional library) are SKIPPED with the reason. docs/huggingface.md's
family table of the installed transformers version is checked against the outcome."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import abft_kernels  # noqa: E402,F401  (registers "abft")
import hf_families  # noqa: E402

MODEL_TYPES = hf_families.causal_lm_model_types()
RESULTS = {}  # model type -> (outcome, outcome with windows), filled by test_family
TABLE_VERSIONS = sorted(hf_families.readme_sections())  # the versions docs/huggingface.md has a table of


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family(model_type):
    outcome = hf_families.run_family(model_type)
    windows = hf_families.run_windows(model_type)
    RESULTS[model_type] = (outcome, windows)
    assert outcome.status in (hf_families.PASS, hf_families.REFUSED, hf_families.SKIPPED)
    assert outcome.status == hf_families.PASS or outcome.reason, "a refusal or skip must say why"
    if outcome.status == hf_families.SKIPPED:
        pytest.skip(outcome.reason)


@pytest.mark.skipif(transformers.__version__ not in TABLE_VERSIONS,
                    reason=f"docs/huggingface.md has tables of transformers {TABLE_VERSIONS} only")
def test_readme_family_table_is_the_matrix():
    results = {t: RESULTS[t] if t in RESULTS else (hf_families.run_family(t), hf_families.run_windows(t))
               for t in MODEL_TYPES}
    assert hf_families.readme_section() == hf_families.readme_table(results), \
        "docs/huggingface.md's family table differs from the matrix: run `python tests/hf/hf_families.py` to rewrite it"
