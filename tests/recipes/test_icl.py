"""ICL prompts on the real SmolLM2 tokenizer, the data loaders, and the paper's read-out."""
import json
import re
from collections import Counter

import pytest
import torch

from abft_fixtures import needs_builtin, truncated_model
from abft_kernels.recipes.icl import (PAPER_TASKS, Example, ICLCollator, PromptBuilder, Template, load_task,
                              sample_prompts, training_prompts)

pytestmark = needs_builtin


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from abft_kernels.recipes.models import convert_default_model

    return AutoTokenizer.from_pretrained(convert_default_model())


@pytest.fixture(scope="module")
def sentiment():
    return load_task("rt-sentiment", test_size=64)


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
def test_paper_label_words_are_single_tokens_with_a_leading_space(tokenizer, name):
    template = PAPER_TASKS[name].template
    builder = PromptBuilder(tokenizer, template)
    assert [tokenizer.decode([i]) for i in builder.label_token_ids] == [f" {w}" for w in template.label_words]


SPLIT_ON_SMOLLM2 = {"tee": "'sad' -> ['s', 'ad']", "teh": "'hate' -> ['h', 'ate']"}  # bare; " sad", " hate": one


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
def test_staicc_style_reads_the_bare_word_and_the_loss_at_the_colon(tokenizer, name):
    """The staicc read-out is the bare word's one token; SmolLM2 splits bare "sad" (TEE) and "hate" (TEH), which
    StaICC would read as "ad" and "ate": refused, naming the words. The loss row is the query's ':' (the authors'
    row), the read-out row the trailing space after it; the demonstrations carry the word with its leading space."""
    template = PAPER_TASKS[name].template
    if name in SPLIT_ON_SMOLLM2:
        with pytest.raises(ValueError, match=f"are split by the tokenizer .*smollm2.*{re.escape(SPLIT_ON_SMOLLM2[name])}"):
            PromptBuilder(tokenizer, template, style="staicc")
        return
    builder = PromptBuilder(tokenizer, template, style="staicc")
    assert builder.label_token_ids == [tokenizer(w)["input_ids"][-1] for w in template.label_words]
    assert [tokenizer.decode([i]) for i in builder.label_token_ids] == list(template.label_words)
    assert [tokenizer.decode([i]) for i in builder.demonstration_token_ids] == [f" {w}" for w in template.label_words]
    prompt = builder.build([Example("a fine day", 1), Example("so so", 0)], Example("what now", 0))
    tokens = [tokenizer.decode([i]) for i in prompt.input_ids]
    assert tokens[prompt.query_row] == " " and prompt.query_row == len(tokens) - 1  # the read-out: trailing space
    assert tokens[prompt.loss_row] == ":" and prompt.loss_row == prompt.query_row - 1  # the loss: the colon
    assert [tokens[i] for i in prompt.label_positions] == [f" {template.label_words[c]}" for c in (1, 0)]


def test_staicc_style_names_every_split_label_word(tokenizer):
    template = Template("review: ", "sentiment:", ("sad", "glad"))  # bare: "s" "ad" and "gl" "ad"
    assert len(set(PromptBuilder(tokenizer, template, style="space-on-label").label_token_ids)) == 2
    with pytest.raises(ValueError, match=r"label words \['glad', 'sad'\] are split"):
        PromptBuilder(tokenizer, template, style="staicc")


def test_prompt_label_positions_and_classes_token_by_token(tokenizer, sentiment):
    builder = PromptBuilder(tokenizer, sentiment.template)
    demos = [sentiment.train[i] for i in range(6)]
    query = sentiment.test[0]
    prompt = builder.build(demos, query)
    tokens = [tokenizer.decode([i]) for i in prompt.input_ids]
    words = sentiment.template.label_words

    expected_text = "".join(f"review: {d.text} sentiment: {words[d.label]}\n" for d in demos)
    expected_text += f"review: {query.text} sentiment:"
    assert "".join(tokens) == expected_text
    assert tokenizer(expected_text)["input_ids"] == prompt.input_ids  # the model sees the natural tokenization
    assert prompt.label_classes == [d.label for d in demos]
    assert prompt.gold == query.label
    assert prompt.label_positions == sorted(prompt.label_positions) and len(prompt.label_positions) == 6
    for position, label in zip(prompt.label_positions, prompt.label_classes):
        assert tokens[position] == f" {words[label]}"
        assert tokens[position - 2:position] == [" sentiment", ":"]
        assert tokens[position + 1] == "\n"
    # The query row is the last token, the query's "sentiment:" colon, and carries no label.
    assert prompt.query_row == len(prompt.input_ids) - 1
    assert tokens[-2:] == [" sentiment", ":"]
    # Every " sentiment:" but the query's is followed by a label position.
    colons = [i for i in range(1, len(tokens)) if tokens[i - 1:i + 1] == [" sentiment", ":"]]
    assert [c + 1 for c in colons[:-1]] == prompt.label_positions and colons[-1] == prompt.query_row


def test_label_word_that_is_not_one_token_raises(tokenizer):
    with pytest.raises(ValueError, match="label word 'supercalifragilistic'"):
        PromptBuilder(tokenizer, Template("review: ", "sentiment:", ("bad", "supercalifragilistic")))


def test_collator_pads_on_the_right_and_marks_label_keys(tokenizer, sentiment):
    builder = PromptBuilder(tokenizer, sentiment.template)
    prompts = [builder.build(sentiment.train[:2], sentiment.test[0]), builder.build(sentiment.train[2:5], sentiment.test[1])]
    batch = ICLCollator(pad_token_id=tokenizer.pad_token_id)(prompts)
    length = max(len(p.input_ids) for p in prompts)
    assert batch["input_ids"].shape == batch["key_class"].shape == (2, length)
    for b, p in enumerate(prompts):
        n = len(p.input_ids)
        assert batch["input_ids"][b, :n].tolist() == p.input_ids
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (length - n)
        expected = torch.full((length,), -1)
        expected[p.label_positions] = torch.tensor(p.label_classes)
        assert torch.equal(batch["key_class"][b], expected)
        assert batch["query_rows"][b].tolist() == [n - 1]
        assert batch["target_class"][b].tolist() == [p.gold]


def test_demonstrations_are_random_not_balanced_and_never_the_query(tokenizer):
    pool = [Example(f"text number {i}", 0 if i < 30 else 1) for i in range(40)]
    builder = PromptBuilder(tokenizer, PAPER_TASKS["sst2"].template)
    prompts = training_prompts(builder, pool, k=4, num_prompts=64, seed=0)
    assert prompts == training_prompts(builder, pool, k=4, num_prompts=64, seed=0)  # seeded
    assert prompts != training_prompts(builder, pool, k=4, num_prompts=64, seed=1)
    class_mixes = Counter(tuple(sorted(p.label_classes)) for p in prompts)
    assert class_mixes[(0, 0, 0, 0)] > 0 and len(class_mixes) >= 3  # drawn as they come, not balanced
    for p in prompts:
        text = tokenizer.decode(p.input_ids)
        query = text.rsplit("sentence: ", 1)[1]
        assert text.count(query) == 1  # the query is not among its own demonstrations


def test_gold_demonstration_puts_the_query_class_in_every_training_prompt(tokenizer):
    """gold_demonstration=True: every prompt holds a demonstration of its query's class (never the query itself);
    off, the same pool gives prompts without one. A class with one example in the pool is refused by name."""
    pool = [Example(f"text number {i}", i % 6) for i in range(60)]  # 6 classes, k = 4: many prompts lack the gold
    builder = PromptBuilder(tokenizer, Template("sentence: ", "label:", ("a", "b", "c", "d", "e", "f")))
    uniform = training_prompts(builder, pool, k=4, num_prompts=64, seed=0)
    assert sum(p.gold not in p.label_classes for p in uniform) > 10
    gold = training_prompts(builder, pool, k=4, num_prompts=64, seed=0, gold_demonstration=True)
    assert gold == training_prompts(builder, pool, k=4, num_prompts=64, seed=0, gold_demonstration=True)  # seeded
    assert [p.gold for p in gold] == [p.gold for p in uniform]  # the same queries
    for p in gold:
        assert p.gold in p.label_classes and len(p.label_classes) == 4
        text = tokenizer.decode(p.input_ids)
        assert text.count(text.rsplit("sentence: ", 1)[1]) == 1  # the query is not its own demonstration
    lonely = pool + [Example("the only one", 6)]
    builder7 = PromptBuilder(tokenizer, Template("sentence: ", "label:", ("a", "b", "c", "d", "e", "f", "g")))
    with pytest.raises(ValueError, match=r"class\(es\) \[6\] have a single example"):
        training_prompts(builder7, lonely, k=4, num_prompts=400, seed=0, gold_demonstration=True)


def test_sample_prompts_rejects_a_k_the_pool_cannot_fill(tokenizer):
    builder = PromptBuilder(tokenizer, PAPER_TASKS["sst2"].template)
    with pytest.raises(ValueError, match="k must be"):
        sample_prompts(builder, [Example("a", 0), Example("b", 1)], [Example("c", 0)], k=2, seed=0)


def test_builtin_tasks():
    task = load_task("rt-sentiment", test_size=100)
    assert task.template == PAPER_TASKS["mr"].template and len(task.test) == 100
    assert {e.label for e in task.train} == {0, 1} and len(task.train) > 10_000
    subj = load_task("rt-subj", test_size=100)
    assert subj.template == PAPER_TASKS["subj"].template
    counts = Counter(e.label for e in subj.train + subj.test)
    assert counts[0] == counts[1] > 1000  # balanced like SUBJ


def test_local_csv_with_label_words_and_jsonl_with_class_ids(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("review,verdict\n" + "".join(f"\"text {i}, fine\",{'good' if i % 3 else 'bad'}\n"
                                                     for i in range(30)))
    task = load_task(str(csv_path), text_column="review", label_column="verdict", test_size=10)
    assert task.template.label_words == ("bad", "good") and task.template.input_prefix == "input: "
    assert len(task.test) == 10 and len(task.train) == 20
    assert all(e.label == (0 if int(e.text.split()[1].rstrip(",")) % 3 == 0 else 1) for e in task.train + task.test)

    jsonl_path = tmp_path / "questions.jsonl"
    jsonl_path.write_text("".join(json.dumps({"text": f"question {i}?", "label": i % 6}) + "\n" for i in range(24)))
    trec = load_task(str(jsonl_path), template=PAPER_TASKS["trec"].template, test_size=4)
    assert sorted(e.label for e in trec.train + trec.test) == sorted(i % 6 for i in range(24))
    with pytest.raises(ValueError, match="integer labels need a template"):
        load_task(str(jsonl_path), test_size=4)
    with pytest.raises(ValueError, match="column 'sentence'"):
        load_task(str(jsonl_path), text_column="sentence", template=PAPER_TASKS["trec"].template)


def test_read_out_is_argmax_over_label_word_logits_at_the_query_token(tokenizer, sentiment):
    """evaluate() against a plain sdpa forward of each prompt alone, and its label attention against
    eager attention weights."""
    from abft_kernels.recipes.evaluation import evaluate

    model, _ = truncated_model(num_layers=3)
    builder = PromptBuilder(tokenizer, sentiment.template)
    prompts = sample_prompts(builder, sentiment.train, sentiment.test[:6], k=4, seed=0)
    result = evaluate(model, prompts, builder.label_token_ids, tokenizer.pad_token_id, batch_size=4, progress=False)

    model.set_attn_implementation("eager")
    label_ids = torch.tensor(builder.label_token_ids)
    gold_mass = torch.zeros(3, model.config.num_attention_heads)
    with torch.no_grad():
        expected = []
        for p in prompts:
            out = model(torch.tensor([p.input_ids]), output_attentions=True)
            expected.append(int(out.logits[0, -1, label_ids].argmax()))
            gold_keys = [pos for pos, c in zip(p.label_positions, p.label_classes) if c == p.gold]
            gold_mass += torch.stack([a[0, :, -1, gold_keys].sum(-1) for a in out.attentions]) / len(prompts)
    assert result.predictions == expected
    assert result.accuracy == sum(e == p.gold for e, p in zip(expected, prompts)) / len(prompts)
    assert torch.allclose(torch.tensor(result.gold_mass), gold_mass, atol=1e-4)
