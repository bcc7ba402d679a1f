"""Contextual calibration on a tiny random Llama and the tiny offline tokenizer, against a per-prompt oracle."""
import pytest
import torch

import abft_kernels  # noqa: F401  (registers attn_implementation="abft")
from abft_kernels.recipes.calibration import (CONTENT_FREE_QUERIES, content_free_prompts, contextual_calibration,
                                      sample_demonstration_sets)
from abft_kernels.recipes.evaluation import evaluate, label_logits
from abft_kernels.recipes.icl import Example, PromptBuilder, Template
from tiny_icl import tiny_llama, tiny_tokenizer

TEMPLATE = Template("review: ", "sentiment:", ("negative", "neutral", "positive"))
TEXTS = ["a good film", "the plot is dull", "very good movie", "not bad", "a great plot", "dull", "the film was good",
         "bad movie", "great", "not great", "a movie", "the plot"]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    pool = [Example(t, i % 3) for i, t in enumerate(TEXTS)]
    return tokenizer, model, pool


def oracle_probs(model, prompts, label_ids):
    """float64 [P, C]: softmax over the label tokens of each prompt's last-token logits, one unpadded prompt at a
    time."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p.input_ids])).logits[0, -1, label_ids].double().softmax(-1)
                            for p in prompts])


@pytest.mark.parametrize("style", ["staicc", "space-on-label"])
def test_calibration_matches_per_prompt_oracle(setup, style):
    tokenizer, model, pool = setup
    builder = PromptBuilder(tokenizer, TEMPLATE, style=style)
    sets = sample_demonstration_sets(pool, k=3, num_sets=4, seed=0)
    calibration = content_free_prompts(builder, sets)
    queries = [Example(t, (i * 7) % 3) for i, t in enumerate(reversed(TEXTS))]
    prompts = [builder.build(sample_demonstration_sets(pool, 2 + i % 3, 1, seed=i)[0], q)
               for i, q in enumerate(queries)]  # 2-4 demonstrations: prompts of different lengths, padded batches
    result = contextual_calibration(model, prompts, calibration, builder.label_token_ids, tokenizer.pad_token_id,
                                    batch_size=5)

    label_ids = torch.tensor(builder.label_token_ids)
    p_cf = oracle_probs(model, calibration, label_ids).mean(0)
    probs = oracle_probs(model, prompts, label_ids)
    gold = torch.tensor([q.label for q in queries])
    calibrated = (probs / p_cf).argmax(-1)
    assert torch.allclose(torch.tensor(result.content_free_probs, dtype=torch.float64), p_cf, atol=1e-5)
    assert result.uncalibrated_predictions == probs.argmax(-1).tolist()
    assert result.predictions == calibrated.tolist()
    assert result.accuracy == float((calibrated == gold).double().mean())
    assert result.uncalibrated_accuracy == float((probs.argmax(-1) == gold).double().mean())
    assert result.num_prompts == len(prompts) and result.num_content_free_prompts == 4 * 3


def test_calibration_divides_by_the_content_free_distribution(setup):
    """A model biased towards one label on content-free queries: calibration removes that label's advantage."""
    tokenizer, model, pool = setup
    builder = PromptBuilder(tokenizer, TEMPLATE, style="staicc")
    biased = tiny_llama(len(tokenizer))
    with torch.no_grad():
        biased.lm_head.weight[builder.label_token_ids[2]] += 3 * biased.model.norm.weight  # favours "positive"
    prompts = [builder.build(pool[:2], Example(t, 0)) for t in TEXTS[:6]]
    calibration = content_free_prompts(builder, sample_demonstration_sets(pool, 2, 3, seed=1))
    result = contextual_calibration(biased, prompts, calibration, builder.label_token_ids, tokenizer.pad_token_id)
    assert result.uncalibrated_predictions == [2] * 6 and result.uncalibrated_accuracy == 0.0
    assert result.content_free_probs[2] > 0.5
    assert len(set(result.predictions)) > 1  # no longer one label for every query


def test_content_free_prompts_and_demonstration_sets(setup):
    tokenizer, _, pool = setup
    builder = PromptBuilder(tokenizer, TEMPLATE, style="staicc")
    sets = sample_demonstration_sets(pool, k=4, num_sets=5, seed=3)
    assert sets == sample_demonstration_sets(pool, k=4, num_sets=5, seed=3) != sample_demonstration_sets(pool, 4, 5, 4)
    assert all(len(s) == 4 and len({id(e) for e in s}) == 4 for s in sets)
    prompts = content_free_prompts(builder, sets)
    assert len(prompts) == 5 * len(CONTENT_FREE_QUERIES) == 15
    for i, prompt in enumerate(prompts):
        demos, query = sets[i // 3], CONTENT_FREE_QUERIES[i % 3]
        assert prompt == builder.build(demos, Example(query, 0))
        assert builder.text(demos, Example(query, 0)).endswith(f"review: {query} sentiment: ")
    with pytest.raises(ValueError, match="k must be in"):
        sample_demonstration_sets(pool, k=len(pool) + 1, num_sets=1, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        content_free_prompts(builder, [])


def test_label_logits_is_evaluates_read_out(setup):
    tokenizer, _, pool = setup
    model = tiny_llama(len(tokenizer))
    model.set_attn_implementation("abft")
    builder = PromptBuilder(tokenizer, TEMPLATE, style="staicc")
    prompts = [builder.build(pool[i:i + 1 + i % 3], pool[-1 - i]) for i in range(5)]
    logits = label_logits(model, prompts, builder.label_token_ids, tokenizer.pad_token_id, batch_size=2)
    result = evaluate(model, prompts, builder.label_token_ids, tokenizer.pad_token_id, batch_size=3, progress=False)
    assert logits.shape == (5, 3) and logits.dtype == torch.float32
    assert result.predictions == logits.argmax(-1).tolist()
    oracle = oracle_probs(model, prompts, torch.tensor(builder.label_token_ids))
    assert torch.allclose(logits.double().softmax(-1), oracle, atol=1e-5)
