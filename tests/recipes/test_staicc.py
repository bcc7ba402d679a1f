"""Prompt styles (StaICC's default and space-on-label) and StaICC's protocol rebuilt from its data files, on a tiny
offline tokenizer and generated files in StaICC's export format."""
import json

import pytest

from abft_kernels.recipes.icl import (Example, PromptBuilder, StaICCTask, Template, is_staicc_source, load_staicc,
                              staicc_prompts, staicc_template)
from tiny_icl import tiny_tokenizer, write_staicc_diag, write_staicc_files

SENTIMENT = Template("review: ", "sentiment:", ("negative", "positive"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def staicc_text(template: dict, label_space, demos, query: str) -> str:
    """StaICC's prompt writer as its export's README describes it (written out independently of the package)."""
    (prefix,), (affix,) = template["input_text_prefixes"], template["input_text_affixes"]
    text = template["instruction"]
    for demo_text, label in demos:
        text += prefix + demo_text + affix + template["label_prefix"] + label_space[label] + template["label_affix"]
    return text + template["query_prefix"] + prefix + query + affix + template["label_prefix"]


def test_staicc_style_ends_with_the_space_and_reads_the_bare_word(tokenizer):
    demos = [Example("a good film", 1), Example("the plot is dull", 0), Example("very good", 1)]
    query = Example("a dull movie", 0)
    staicc = PromptBuilder(tokenizer, SENTIMENT, style="staicc")
    spaced = PromptBuilder(tokenizer, SENTIMENT, style="space-on-label")

    expected = ("review: a good film sentiment: positive\nreview: the plot is dull sentiment: negative\n"
                "review: very good sentiment: positive\nreview: a dull movie sentiment: ")
    assert staicc.text(demos, query) == expected
    assert spaced.text(demos, query) == expected[:-1]  # same demonstrations, no trailing space

    vocab = tokenizer.get_vocab()
    assert staicc.label_token_ids == [vocab["negative"], vocab["positive"]]  # bare words: tokenizer(word)[-1]
    assert staicc.demonstration_token_ids == [vocab["Ġnegative"], vocab["Ġpositive"]]
    assert spaced.label_token_ids == spaced.demonstration_token_ids == staicc.demonstration_token_ids

    for builder, last in ((staicc, "Ġ"), (spaced, ":")):
        prompt = builder.build(demos, query)
        tokens = tokenizer.convert_ids_to_tokens(prompt.input_ids)
        assert prompt.input_ids == tokenizer(builder.text(demos, query))["input_ids"]
        assert tokens[prompt.query_row] == last and prompt.query_row == len(tokens) - 1
        assert [tokens[i] for i in prompt.label_positions] == ["Ġpositive", "Ġnegative", "Ġpositive"]
        assert prompt.label_classes == [1, 0, 1] and prompt.gold == 0
        assert all(tokens[i + 1] == "Ċ" for i in prompt.label_positions)


def test_label_words_without_a_read_out_or_label_token_raise(tokenizer):
    meh = Template("review: ", "sentiment:", ("negative", "meh"))  # " meh" is a token, bare "meh" is [UNK]
    assert PromptBuilder(tokenizer, meh, style="space-on-label").label_token_ids[1] == tokenizer.get_vocab()["Ġmeh"]
    with pytest.raises(ValueError, match="label word 'meh'.*special token"):
        PromptBuilder(tokenizer, meh, style="staicc")
    unknown = Template("review: ", "sentiment:", ("negative", "zzz"))  # [UNK] even after a space
    for style in ("staicc", "space-on-label"):
        with pytest.raises(ValueError, match="label word 'zzz' becomes the special token"):
            PromptBuilder(tokenizer, unknown, style=style)
    with pytest.raises(ValueError, match="style must be one of"):
        PromptBuilder(tokenizer, SENTIMENT, style="staicc-default")


# A non-default StaICC template exercises every field: instruction, query prefix, tab label affix.
TEMPLATE = {"instruction": "Label the film. ", "input_text_prefixes": ["sentence: "], "input_text_affixes": [" "],
            "label_prefix": "Label: ", "label_affix": "\t", "query_prefix": "Q "}
LABELS = ["negative", "neutral", "positive"]
TEXTS = ["a good film", "the plot is dull", " very  good movie ", "not bad", "a great plot", "dull", "the film",
         "good", "bad movie", "great", "not great", "a movie", "the plot was good", "N/A"]


def make_root(tmp_path, **changes):
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)]
    calibration, demonstration, test = [13, 1, 7], [0, 5, 9, 11, 3, 12], [4, 2, 10, 6]
    demo_pos = [[0, 2], [5, 1], [3, 3], [4, 0], [1, 2], [2, 5], [0, 4], [3, 1]]  # 2 sets per test item
    args = dict(rows=rows, template=TEMPLATE, label_space=LABELS, calibration=calibration,
                demonstration=demonstration, test=test, demo_pos=demo_pos)
    args.update(changes)
    return write_staicc_files(tmp_path / "staicc", "tiny_set", **args)


def test_load_staicc_splits_and_prompt_bytes(tmp_path, tokenizer):
    root = make_root(tmp_path)
    task = load_staicc("staicc:tiny_set", root)
    assert isinstance(task, StaICCTask) and task.name == "staicc:tiny_set"
    rows = [(t, i % 3) for i, t in enumerate(TEXTS)]
    assert [(e.text, e.label) for e in task.train] == [rows[i] for i in (13, 1, 7)]  # training pool = calibration
    assert [(e.text, e.label) for e in task.demonstrations] == [rows[i] for i in (0, 5, 9, 11, 3, 12)]
    assert [(e.text, e.label) for e in task.test] == [rows[i] for i in (4, 2, 10, 6)]
    assert task.test[1].text == " very  good movie "  # texts as stored: StaICC's bytes
    assert task.template == Template("sentence: ", "Label:", tuple(LABELS), instruction="Label the film. ",
                                     input_affix=" ", label_affix="\t", query_prefix="Q ")
    assert load_staicc("tiny", root) is not None and load_staicc("staicc:TINY_SET", root).test == task.test

    builder = PromptBuilder(tokenizer, task.template, style="staicc")
    prompts = staicc_prompts(builder, task)
    assert len(prompts) == 8 and len(staicc_prompts(builder, task, 3)) == 3
    demonstration = [0, 5, 9, 11, 3, 12]
    demo_pos = [[0, 2], [5, 1], [3, 3], [4, 0], [1, 2], [2, 5], [0, 4], [3, 1]]
    for j, prompt in enumerate(prompts):
        test_row = [4, 2, 10, 6][j % 4]
        demos = [rows[demonstration[p]] for p in demo_pos[j]]
        expected = staicc_text(TEMPLATE, LABELS, demos, rows[test_row][0])
        assert builder.text(*task.prompt_examples(j)) == expected
        assert prompt.input_ids == tokenizer(expected)["input_ids"]
        assert prompt.gold == rows[test_row][1] and prompt.label_classes == [label for _, label in demos]
        tokens = tokenizer.convert_ids_to_tokens(prompt.input_ids)
        assert [tokens[i] for i in prompt.label_positions] == ["Ġ" + LABELS[label] for _, label in demos]
        assert [tokens[i - 2:i] for i in prompt.label_positions] == [["ĠLabel", ":"]] * 2
        assert [tokens[i + 1] for i in prompt.label_positions] == ["ĉ", "ĉ"]
        assert tokens[-3:] == ["ĠLabel", ":", "Ġ"] and prompt.query_row == len(tokens) - 1

    with pytest.raises(ValueError, match="num_prompts must be in"):
        staicc_prompts(builder, task, 9)
    with pytest.raises(ValueError, match="not the task's"):
        staicc_prompts(PromptBuilder(tokenizer, SENTIMENT, style="staicc"), task)


def test_load_staicc_refuses_inconsistent_files(tmp_path):
    with pytest.raises(ValueError, match="needs the folder of StaICC's exported data"):
        load_staicc("staicc:mr", None)
    with pytest.raises(ValueError, match="has no splits.json"):
        load_staicc("tiny_set", tmp_path)
    root = make_root(tmp_path)
    with pytest.raises(ValueError, match="'sst2' is not in"):
        load_staicc("staicc:sst2", root)
    splits = json.loads((root / "splits.json").read_text())
    spec = splits["datasets"]["tiny_set"]

    def broken(mutate, match):
        data = json.loads(json.dumps(splits))
        mutate(data["datasets"]["tiny_set"])
        (root / "splits.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            load_staicc("tiny_set", root)

    broken(lambda s: s["prompts"][2].update(demo_rows=[0, 0]), "prompt 2's demo_rows")
    broken(lambda s: s["prompts"][1].update(test_pos=0, test_row=4), "prompt 1 has test_pos 0")
    broken(lambda s: s["prompts"][0].update(demo_pos=[0, 99]), "prompt 0 has demo_pos")
    broken(lambda s: s.update(test_rows=[4, 2, 10, 99]), "test_rows holds rows \\[99\\]")
    broken(lambda s: s.update(label_mapping={"0": 1, "1": 0, "2": 2}), "not the identity")
    broken(lambda s: s["template"].update(label_prefix="Label:"), "does not end with a space")
    broken(lambda s: s.update(use_noisy_channel=True), "noisy-channel")
    assert spec["file"] == "tiny_set.jsonl"
    (root / "splits.json").write_text(json.dumps(splits))
    (root / "tiny_set.jsonl").write_text(json.dumps({"text": "x", "label": 3}) + "\n")
    with pytest.raises(ValueError, match="row 0: needs a string 'text' and a 'label' in \\[0, 3\\)"):
        load_staicc("tiny_set", root)


def test_staicc_template_and_source_names():
    assert is_staicc_source("staicc:mr") and not is_staicc_source("mr")
    template = staicc_template({"instruction": "", "input_text_prefixes": ["review: "], "input_text_affixes": [" "],
                                "label_prefix": "sentiment: ", "label_affix": "\n", "query_prefix": ""},
                               ["negative", "positive"])
    assert template == SENTIMENT  # StaICC's MR template is the package's MR template
    with pytest.raises(ValueError, match="2 input texts"):
        staicc_template({**TEMPLATE, "input_text_prefixes": ["a: ", "b: "], "input_text_affixes": [" ", " "]},
                        LABELS)


def test_train_and_eval_commands_follow_staicc(tmp_path, tokenizer):
    """`abft train/eval --dataset staicc:<name> --staicc-root DIR`: StaICC's splits and prompts, StaICC's prompt style
    by default, and `abft eval --weights` rebuilds the same held-out prompts from the run's settings."""
    from tiny_icl import tiny_llama

    from abft_kernels.recipes.cli import main

    root = make_root(tmp_path)
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    main(["train", "--model", str(tmp_path / "model"), "--dataset", "staicc:tiny_set", "--staicc-root", str(root),
          "--k", "2", "--eval-prompts", "8", "--steps", "1", "--prompts-per-step", "2", "--micro-batch", "2",
          "--train-prompts", "2", "--output-dir", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "abft_config.json").read_text())["settings"]
    assert saved["prompt_style"] == "staicc" and saved["staicc_root"] == str(root)
    main(["eval", "--weights", str(tmp_path / "run"), "--output-dir", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["before"]["num_prompts"] == report["after"]["num_prompts"] == 8  # StaICC's 4 test items x 2 sets
    assert len(report["before"]["predictions"]) == 8


OTHER_TEMPLATE = {**TEMPLATE, "instruction": "", "input_text_prefixes": ["text: "], "label_prefix": "label: ",
                  "label_affix": " "}


def test_load_staicc_reads_the_template_consistency_diagnostic(tmp_path):
    root = make_root(tmp_path)
    assert load_staicc("tiny_set", root).consistency_plan is None  # no diag.json: no plan
    write_staicc_diag(root, "tiny_set", [TEMPLATE, OTHER_TEMPLATE], LABELS, test=[4, 2, 10, 6],
                      demonstration=[0, 5, 9, 11, 3, 12], demo_pos=[[0, 2], [5, 1], [3, 3]])
    task = load_staicc("tiny_set", root)
    assert task.consistency_templates[0] == task.template and len(task.consistency_templates) == 2
    assert task.consistency_templates[1].input_prefix == "text: " and task.consistency_templates[1].label_affix == " "
    assert task.consistency_plan == [((0, 2), 0), ((5, 1), 1), ((3, 3), 2)]
    write_staicc_diag(root, "tiny_set", [OTHER_TEMPLATE], LABELS, [4, 2, 10, 6], [0, 5, 9, 11, 3, 12], [[0, 2]])
    with pytest.raises(ValueError, match="template 0 is not the dataset's default template"):
        load_staicc("tiny_set", root)
    for test, demonstration in (([5, 2, 10, 6], [0, 5, 9, 11, 3, 12]), ([4, 2, 10, 6], [7] * 6)):
        write_staicc_diag(root, "tiny_set", [TEMPLATE], LABELS, test, demonstration, [[0, 2]])
        with pytest.raises(ValueError, match="does not fit the demonstration split"):
            load_staicc("tiny_set", root)
    write_staicc_diag(root, "tiny_set", [TEMPLATE], LABELS, [4, 2, 10, 6], [0, 5, 9, 11, 3, 12], [[0, 2]])
    diag = json.loads((root / "diag.json").read_text())
    diag["template_consistency"]["datasets"]["tiny_set"]["templates"].append({**OTHER_TEMPLATE,
                                                                               "label_space": ["a", "b", "c"]})
    (root / "diag.json").write_text(json.dumps(diag))
    with pytest.raises(ValueError, match="a template has label words"):
        load_staicc("tiny_set", root)
