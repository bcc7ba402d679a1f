"""`abft suite` end to end on the offline tiny tokenizer and a tiny Llama, with generated CSV tasks: the report's
structure and invariants (accuracies in [0, 1], consistency in [1/C, 1], unseen-label prompts without the gold label,
calibration equal to the calibration module's on the same prompts)."""
import csv
import json
import random
from dataclasses import asdict, replace

import pytest
import torch

from abft_kernels.recipes.calibration import contextual_calibration
from abft_kernels.recipes.cli import main
from abft_kernels.recipes.icl import Example, PromptBuilder, Template
from abft_kernels.recipes.models import load_model
from abft_kernels.recipes.suite import (SUITE, SuiteRun, calibration_prompts, consistency, parse_parts,
                                format_report, unseen_label_prompts)
from abft_kernels.recipes.training import count_check
from tiny_icl import tiny_tokenizer

FILLERS = ["movie", "film", "plot", "the", "a", "is", "was", "very", "not"]


def counting_llama(vocab_size: int):
    """A tiny random Llama (2 layers, 4 query / 2 key-value heads) with peaked attention (weights of std 0.5, as in
    test_train_options.py), so that some heads pass the induction filter and ABFT's loss moves W_Q/W_K."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.5)
    return LlamaForCausalLM(config).eval()


def save_counting_llama(directory):
    """counting_llama with the offline tiny tokenizer, saved to `directory` for --model; returns the tokenizer."""
    tokenizer = tiny_tokenizer()
    counting_llama(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_task(path, words, rows=48):
    """A CSV task whose string labels are `words` (the label is the class's word among the text's words)."""
    rng = random.Random(len(words))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            word = words[i % len(words)]
            writer.writerow([" ".join(rng.sample(FILLERS, rng.randint(1, 4)) + [word]), word])
    return path


SIZE = ["--k", "2", "--eval-prompts", "8", "--steps", "2", "--prompts-per-step", "4", "--micro-batch", "4",
        "--train-prompts", "8", "--lr", "1e-2", "--calibration-sets", "3", "--consistency-queries", "4",
        "--consistency-sets", "3", "--unseen-queries", "6", "--connectivity-lambdas", "0,1", "--threads", "1",
        "--batch-size", "8"]


def test_suite_end_to_end(tmp_path, capsys):
    tokenizer = save_counting_llama(tmp_path / "model")
    task = write_task(tmp_path / "sentiment.csv", ["negative", "neutral", "positive"])
    ood = write_task(tmp_path / "quality.csv", ["bad", "good"])
    options = ["--model", str(tmp_path / "model"), "--dataset", str(task), *SIZE]
    main(["suite", *options, "--ood-dataset", str(ood), "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    for row in ("accuracy", "calibration", "out-of-domain", "demo consistency (3 sets)", "acc. unseen-label demos"):
        assert row in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert report["parts"] == ["table", "ood", "demo-consistency", "template-consistency", "unseen-label",
                               "mode-connectivity"]
    assert len(report["mode-connectivity"]["accuracy"]) == 2 and "mode connectivity (8 prompts)" in printed
    assert "has none" in report["template-consistency"]["skipped"]  # a CSV task: no alternative templates known
    assert "template-consistency: skipped (template consistency needs StaICC's alternative templates" in printed
    assert set(report["training"]) == {"abft", "e2e"}
    assert report["training"]["e2e"]["objective"] == "e2e"
    check = report["training"]["abft"]["count_check"]  # the check `abft train` makes, on the ABFT run only
    assert check["summary"] in printed and report["training"]["abft"]["warnings"] == check["warnings"]
    assert "count_check" not in report["training"]["e2e"]

    table = report["table"]
    accuracies = [table[m]["accuracy"] for m in ("vanilla", "calibration", "abft", "e2e")]
    accuracies += [*report["ood"]["in_domain"].values(), *report["ood"]["out_of_domain"].values()]
    accuracies += [a for kinds in report["unseen-label"]["accuracy"].values() for a in kinds.values()]
    assert all(0 <= a <= 1 for a in accuracies) and len(accuracies) == 4 + 6 + 9
    assert table["vanilla"]["num_prompts"] == table["abft"]["num_prompts"] == table["calibration"]["num_prompts"] == 8
    assert table["abft"]["gold_mass"] != table["vanilla"]["gold_mass"]  # training moved the attention
    assert report["ood"]["num_ood_prompts"] == 8
    assert report["ood"]["in_domain"]["abft"] == table["abft"]["accuracy"]  # same prompts, same read-out

    demo = report["demo-consistency"]
    assert set(demo["models"]) == {"vanilla", "abft", "e2e"} and demo["num_classes"] == 3
    for values in demo["models"].values():
        assert len(values["predictions"]) == 4 and all(len(row) == 3 for row in values["predictions"])
        assert 1 / 3 <= values["consistency"] <= 1 and values["consistency"] == consistency(values["predictions"])

    unseen = report["unseen-label"]
    labels = unseen["demonstration_labels"]
    assert all(labels["zero_shot"][i] == [] for i in range(6))
    assert all(len(labels[kind][i]) == 2 for kind in ("random", "unseen_label") for i in range(6))
    assert all(gold not in demos for gold, demos in zip(unseen["golds"], labels["unseen_label"]))

    # Calibration: the calibration module on the same held-out and content-free prompts gives the same numbers.
    settings = replace(SUITE, model=str(tmp_path / "model"), dataset=str(task), k=2, eval_prompts=8,
                       calibration_sets=3)
    run = SuiteRun(settings, tmp_path / "unused", torch.device("cpu"))
    expected = contextual_calibration(run.model("vanilla"), run.prompts,
                                      calibration_prompts(run.builder, run.task, settings),
                                      run.builder.label_token_ids, tokenizer.pad_token_id)
    assert table["calibration"]["accuracy"] == expected.accuracy
    assert table["calibration"]["predictions"] == expected.predictions
    assert table["calibration"]["num_content_free_prompts"] == 3 * 3
    assert [p.gold for p in run.prompts] and len(run.prompts) == 8


def test_parts_run_alone_and_train_only_what_they_need(tmp_path):
    """--parts ood,unseen-label on a dataset without a default second task: ood is skipped (said in the report),
    and unseen-label trains ABFT only (E2E is compared only when an earlier part trained it)."""
    tokenizer = save_counting_llama(tmp_path / "model")
    task = write_task(tmp_path / "sentiment.csv", ["negative", "positive"])
    main(["suite", "--model", str(tmp_path / "model"), "--dataset", str(task), *SIZE, "--parts", "unseen-label,ood",
          "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["parts"] == ["ood", "unseen-label"] and "table" not in report
    assert report["ood"] == {"skipped": f"no --ood-dataset for {str(task)!r}"}
    assert set(report["training"]) == {"abft"} and set(report["unseen-label"]["accuracy"]) == {"vanilla", "abft"}
    assert all(gold not in demos for gold, demos in zip(report["unseen-label"]["golds"],
                                                        report["unseen-label"]["demonstration_labels"]["unseen_label"]))


def test_report_keeps_the_parts_finished_before_an_interrupt(tmp_path, monkeypatch):
    """report.json is written after every part: a run stopped in its second part keeps the first."""
    from abft_kernels.recipes import suite

    tokenizer = save_counting_llama(tmp_path / "model")
    task = write_task(tmp_path / "sentiment.csv", ["negative", "positive"])

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setitem(suite.PARTS, "unseen-label", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["suite", "--model", str(tmp_path / "model"), "--dataset", str(task), *SIZE,
              "--parts", "ood,unseen-label", "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "skipped" in report["ood"] and "unseen-label" not in report and "total" not in report["seconds"]


def test_no_e2e_trains_abft_only_and_skips_what_needs_e2e(tmp_path, capsys):
    """--no_e2e: the table has no E2E column (printed as "-"), nothing trains E2E, mode connectivity says why it
    was skipped."""
    tokenizer = save_counting_llama(tmp_path / "model")
    task = write_task(tmp_path / "sentiment.csv", ["negative", "positive"])
    main(["suite", "--model", str(tmp_path / "model"), "--dataset", str(task), *SIZE, "--no_e2e",
          "--parts", "table,mode-connectivity", "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["training"]) == {"abft"} and "e2e" not in report["table"]
    assert set(report["table"]) >= {"vanilla", "calibration", "abft"}
    assert report["mode-connectivity"] == {"skipped": "it needs the E2E model (--no_e2e)"}
    out = capsys.readouterr().out
    assert "mode-connectivity: skipped" in out
    [accuracy_line] = [line for line in out.splitlines() if line.startswith("accuracy")]
    assert accuracy_line.split()[-1] == "-"


def test_unseen_label_prompts_never_show_the_gold_label():
    tokenizer = tiny_tokenizer()
    builder = PromptBuilder(tokenizer, Template("review: ", "sentiment:", ("negative", "neutral", "positive")))
    pool = [Example(w, i % 3) for i, w in enumerate(FILLERS * 2)]
    queries = [Example("a good film", i % 3) for i in range(9)]
    kinds = unseen_label_prompts(builder, pool, queries, k=4, seed=0)
    assert [len(prompts) for prompts in kinds.values()] == [9, 9, 9]
    for zero, rand, unseen in zip(*kinds.values()):
        assert zero.label_classes == [] and len(rand.label_classes) == len(unseen.label_classes) == 4
        assert unseen.gold not in unseen.label_classes
    assert any(p.gold in p.label_classes for p in kinds["random"])  # random demonstrations can show it
    with pytest.raises(ValueError, match="without the label"):
        unseen_label_prompts(builder, pool[:4], queries, k=4, seed=0)


def test_parts_and_objective_are_checked():
    assert parse_parts("unseen-label, table") == ["table", "unseen-label"]
    with pytest.raises(ValueError, match="--parts must name"):
        parse_parts("table,calibration")
    with pytest.raises(ValueError, match="not an option of the suite"):
        main(["suite", "--objective", "e2e", "--parts", "table"])
    with pytest.raises(ValueError, match="mode-connectivity part interpolates full-precision weights"):
        main(["suite", "--load-in-4bit", "--lora", "16", "--parts", "mode-connectivity"])
    with pytest.raises(ValueError, match="--connectivity-lambdas"):
        main(["suite", "--parts", "mode-connectivity", "--connectivity-lambdas", "1,0"])


def test_template_consistency_follows_staicc_diag(tmp_path):
    """--parts template-consistency on a StaICC task with diag.json: its templates, test items and demonstrations;
    each template read out on its own label tokens; consistency over the templates."""
    from test_staicc import LABELS, OTHER_TEMPLATE, TEMPLATE, make_root
    from tiny_icl import write_staicc_diag

    tokenizer = save_counting_llama(tmp_path / "model")
    root = make_root(tmp_path)
    third = {**OTHER_TEMPLATE, "instruction": "Label the film. ", "label_affix": "\n"}
    write_staicc_diag(root, "tiny_set", [TEMPLATE, OTHER_TEMPLATE, third], LABELS, test=[4, 2, 10, 6],
                      demonstration=[0, 5, 9, 11, 3, 12], demo_pos=[[0, 2], [5, 1], [3, 3], [4, 0]])
    main(["suite", "--model", str(tmp_path / "model"), "--dataset", "staicc:tiny_set", "--staicc-root", str(root),
          *SIZE, "--template-queries", "3", "--parts", "template-consistency", "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())["template-consistency"]
    assert report["num_templates"] == 3 and report["num_queries"] == 3 and report["source"].startswith("StaICC's diag")
    assert [t["input_prefix"] for t in report["templates"]] == ["sentence: ", "text: ", "text: "]
    assert set(report["models"]) == {"vanilla", "abft"}
    for values in report["models"].values():
        assert len(values["predictions"]) == 3 and all(len(row) == 3 for row in values["predictions"])
        assert values["consistency"] == consistency(values["predictions"]) and 1 / 3 <= values["consistency"] <= 1
        assert len(values["accuracy_per_template"]) == 3
        # template t's accuracy is its column of predictions against the test items' golds (rows 4, 2, 10: labels
        # 4 % 3, 2 % 3, 10 % 3)
        golds = [1, 2, 1]
        for t, acc in enumerate(values["accuracy_per_template"]):
            assert acc == sum(row[t] == g for row, g in zip(values["predictions"], golds)) / 3


def test_mode_connectivity_grid_corners_are_the_three_models(tmp_path):
    """The grid point (0, 0) is the base model, (lambda_E, lambda_A) = (0, 1) the ABFT-trained and (1, 0) the
    E2E-trained model (its LoRA adapters merged): their accuracies equal the table's on the same prompts."""
    tokenizer = save_counting_llama(tmp_path / "model")
    task = write_task(tmp_path / "sentiment.csv", ["negative", "neutral", "positive"], rows=96)
    main(["suite", "--model", str(tmp_path / "model"), "--dataset", str(task), *SIZE, "--eval-prompts", "24",
          "--parts", "table,mode-connectivity", "--connectivity-lambdas=-0.5,0,1", "--connectivity-prompts", "24",
          "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    connectivity, table = report["mode-connectivity"], report["table"]
    assert connectivity["lambdas"] == [-0.5, 0, 1] and connectivity["num_prompts"] == 24
    grid = connectivity["accuracy"]  # grid[i][j]: lambda_E = lambdas[i], lambda_A = lambdas[j]
    assert len(grid) == 3 and all(len(row) == 3 for row in grid)
    assert grid[1][1] == table["vanilla"]["accuracy"]
    assert grid[1][2] == table["abft"]["accuracy"]
    assert grid[2][1] == table["e2e"]["accuracy"]
    assert connectivity["changed_tensors"] and all("q_proj" in n or "k_proj" in n for n in connectivity["changed_tensors"])
    assert (tmp_path / "out" / "mode_connectivity.png").read_bytes()[:4] == b"\x89PNG"


def test_connectivity_lambdas_are_checked():
    from abft_kernels.recipes.suite import parse_lambdas

    assert parse_lambdas("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("1", "a,b", "1,1", "0,0,1", "1,0", "nan,1", "0,inf"):
        with pytest.raises(ValueError, match="--connectivity-lambdas"):
            parse_lambdas(bad)


def test_report_shows_the_training_warnings():
    """A collapsed ABFT run (Gemma 3 270M on TREC: 2.6 counted heads at the first step, 0 at the last) is a WARNING
    line of the console table, not only a row of report.json."""
    log = [{"abft_loss": 2.2, "counted_heads": 2.6, "A": 0.5}, {"abft_loss": 0.0, "counted_heads": 0.0, "A": 0.3}]
    check = count_check(log)
    assert check.collapsed and len(check.warnings) == 1
    report = {"settings": {**asdict(SUITE), "model": "m", "dataset": "d"}, "seconds": {"total": 1.0},
              "training": {"abft": {"warnings": check.warnings}, "e2e": {}}}
    printed = format_report(report)
    assert f"WARNING (abft training): {check.warnings[0]}" in printed and printed.count("WARNING") == 1
