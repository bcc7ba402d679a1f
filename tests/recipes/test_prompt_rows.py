"""Which rows of a prompt the read-out and the loss use (issues 22.6, 23.1), label words the tokenizer splits (23.2)
and runs that count no head (23.4), on offline tokenizers built here and tiny random Llamas."""
import csv
import json
import logging

import pytest
import torch

from abft_kernels.forward import abft_forward
from abft_kernels.recipes.icl import LOSS_ROWS, Example, ICLCollator, PromptBuilder, Template
from abft_kernels.recipes.settings import PAPER, data_settings
from abft_kernels.recipes.training import ZERO_COUNT_WARNING, count_check
from abft_kernels.recipes.workflow import held_out_settings
from tiny_icl import WORDS, tiny_llama, tiny_tokenizer

SENTIMENT = Template("review: ", "sentiment:", ("negative", "positive"))
DEMOS = [Example("a good film", 1), Example("the plot is dull", 0), Example("very good", 1)]
QUERY = Example("a dull movie", 0)


def eos_tokenizer():
    """tiny_tokenizer's vocabulary plus <s> and </s>, with a post-processor that writes "<s> $A </s>", as Llama-2
    fast tokenizers do with add_bos_token and add_eos_token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tiny_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<s>", "</s>"])
    bos, eos = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", bos),
                                                                                                  ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def splitting_tokenizer():
    """A byte-level BPE whose merges make " sad" and " joy" one token each and bare "joy" one token, but split bare
    "sad" into "s", "ad" (as SmolLM2 does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("o", "y"), ("j", "oy"), ("Ġ", "joy"), ("a", "d"), ("Ġ", "s"), ("Ġs", "ad")]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(alphabet + ["".join(m) for m in merges] + ["<pad>"]))}
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", name_or_path="tiny-bpe")


@pytest.mark.parametrize("style", ["staicc", "space-on-label"])
def test_an_appended_eos_is_not_the_query_row(style):
    """With a post-processor that appends </s>, the prompt is the plain tokenizer's with <s> in front: the read-out
    row is the template's own last token, not </s>, and the staicc style builds (its bare-word read-out too)."""
    plain, eos = tiny_tokenizer(), eos_tokenizer()
    assert eos("review")["input_ids"][-1] == eos.eos_token_id  # the tokenizer does append it
    expected = PromptBuilder(plain, SENTIMENT, style=style).build(DEMOS, QUERY)
    builder = PromptBuilder(eos, SENTIMENT, style=style)
    prompt = builder.build(DEMOS, QUERY)
    assert prompt.input_ids == [eos.bos_token_id] + expected.input_ids
    assert prompt.label_positions == [p + 1 for p in expected.label_positions]
    assert (prompt.query_row, prompt.loss_row) == (expected.query_row + 1, expected.loss_row + 1)
    assert eos.convert_ids_to_tokens(prompt.input_ids[-1]) == ("Ġ" if style == "staicc" else ":")
    assert builder.label_token_ids == PromptBuilder(plain, SENTIMENT, style=style).label_token_ids


def test_loss_row_is_the_label_prefix_colon_and_the_read_out_row_stays_the_last_token():
    """The authors' row (the default): the loss reads the query's ':' in both styles; the read-out stays the last
    token (the staicc style's trailing space). loss_row="read-out" puts the loss on the read-out row."""
    tokenizer = tiny_tokenizer()
    assert PAPER.loss_row == "label-prefix" and LOSS_ROWS == ("label-prefix", "read-out")
    for style, last in (("staicc", "Ġ"), ("space-on-label", ":")):
        default = PromptBuilder(tokenizer, SENTIMENT, style=style).build(DEMOS, QUERY)
        tokens = tokenizer.convert_ids_to_tokens(default.input_ids)
        assert tokens[default.loss_row] == ":" and tokens[default.loss_row - 1] == "Ġsentiment"
        assert default.loss_row not in default.label_positions and default.loss_row > max(default.label_positions)
        assert tokens[default.query_row] == last and default.query_row == len(tokens) - 1
        read_out = PromptBuilder(tokenizer, SENTIMENT, style=style, loss_row="read-out").build(DEMOS, QUERY)
        assert read_out.loss_row == read_out.query_row == default.query_row
    staicc = PromptBuilder(tokenizer, SENTIMENT, style="staicc").build(DEMOS, QUERY)
    assert staicc.loss_row == staicc.query_row - 1
    batch = ICLCollator(tokenizer.pad_token_id)([staicc])
    assert batch["loss_rows"].tolist() == [[staicc.loss_row]] and batch["query_rows"].tolist() == [[staicc.query_row]]
    with pytest.raises(ValueError, match="loss_row must be one of"):
        PromptBuilder(tokenizer, SENTIMENT, loss_row="colon")


def test_loss_and_filter_read_the_loss_row_read_out_reads_the_last_token():
    """abft_forward's masses are the eager attention's label masses at the loss row (the ':'), and its logits at
    query_rows are the eager logits of the last token."""
    tokenizer = tiny_tokenizer()
    eager = tiny_llama(len(tokenizer)).double()
    model = tiny_llama(len(tokenizer)).double()
    model.set_attn_implementation("abft")
    builder = PromptBuilder(tokenizer, SENTIMENT, style="staicc")
    prompts = [builder.build(DEMOS, QUERY), builder.build(DEMOS[:2], Example("very dull", 0))]
    batch = ICLCollator(tokenizer.pad_token_id)(prompts)
    with torch.no_grad():
        outputs, _, info = abft_forward(model, batch, 2, logits_to_keep=batch["query_rows"])
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            reference = eager(ids, output_attentions=True)
        for layer, weights in enumerate(reference.attentions):  # [1,H,N,N]
            row = weights[0, :, prompt.loss_row]
            expected = torch.stack([row[:, [p for p, c in zip(prompt.label_positions, prompt.label_classes)
                                            if c == cls]].sum(-1) for cls in range(2)], -1)
            torch.testing.assert_close(outputs.attentions[layer][b, :, 0].double(), expected, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(info.label_mass[layer, b, :, 0].double(), expected.sum(-1))  # the filter's S
        torch.testing.assert_close(outputs.logits[b, 0], reference.logits[0, prompt.query_row], rtol=1e-6, atol=1e-9)


def test_saved_runs_record_the_loss_row_and_older_ones_read_as_the_read_out_row():
    run = {"dataset": "rt-subj", "seed": 3, "eval_prompts": 200, "k": 8, "prompt_style": "staicc"}
    assert held_out_settings({}, {"settings": run}).loss_row == "read-out"  # saved before the setting: its row
    saved = {"settings": {**run, "loss_row": "label-prefix"}}
    assert held_out_settings({}, saved).loss_row == "label-prefix"
    assert held_out_settings({"loss_row": "read-out"}, saved).loss_row == "read-out"
    assert data_settings(PAPER).loss_row == "label-prefix"


def test_staicc_style_refuses_label_words_the_tokenizer_splits():
    tokenizer = splitting_tokenizer()
    template = Template("tweet: ", "emotion:", ("joy", "sad"))
    assert tokenizer.tokenize("sad") == ["s", "ad"] and tokenizer.tokenize(" sad") == ["Ġsad"]
    spaced = PromptBuilder(tokenizer, template, style="space-on-label")  # " sad" is one token: read with its space
    assert tokenizer.convert_ids_to_tokens(spaced.label_token_ids) == ["Ġjoy", "Ġsad"]
    with pytest.raises(ValueError, match=r"label words \['sad'\] are split by the tokenizer 'tiny-bpe' "
                                         r"\('sad' -> \['s', 'ad'\]\).*space-on-label"):
        PromptBuilder(tokenizer, template, style="staicc")


def log(*counts, loss="abft_loss"):
    return [{"step": i + 1, "counted_heads": n, loss: 0.0, "gold_mass": 0.04} for i, n in enumerate(counts)]


def test_count_check_warns_when_the_first_step_counts_no_head():
    check = count_check(log(0.0, 0.0, 0.0))
    assert check.warnings == [ZERO_COUNT_WARNING] and "no head counted at the start" in check.summary
    assert "stayed within" not in check.summary and not check.exploded
    assert "--loss-row" in ZERO_COUNT_WARNING and "--count-all-heads" in ZERO_COUNT_WARNING
    assert count_check(log(0.0, 2.0)).warnings == [ZERO_COUNT_WARNING]  # rises later: still started with none
    assert count_check(log(0.0, 0.0, loss="e2e_loss")).warnings == []  # the e2e loss does not use the count
    assert count_check(log(3.0, 0.0)).warnings != [ZERO_COUNT_WARNING]  # a collapse, not a start without heads


def test_train_command_warns_in_the_console_and_report_when_no_head_counts(tmp_path, caplog, capsys):
    """A tiny Llama of near-uniform attention (init std 0.02): no head passes the filter S > T, so the loss is 0; the
    first step logs a WARNING and report.json carries it."""
    from abft_kernels.recipes.cli import main

    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    fillers = [w for w in WORDS if w not in ("negative", "positive", "N/A", "Q", "label", "Label", "sentiment")]
    with (tmp_path / "task.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([" ".join(fillers[i % 7:i % 7 + 4]), i % 2] for i in range(24))
    with caplog.at_level(logging.WARNING, logger="abft_kernels.recipes.training"):
        main(["train", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "task.csv"),
              "--label-words", "negative,positive", "--input-prefix", "review: ", "--label-prefix", "sentiment:",
              "--eval-prompts", "8", "--k", "2", "--threads", "1", "--steps", "2", "--prompts-per-step", "2",
              "--micro-batch", "2", "--train-prompts", "4", "--save-steps", "0", "--output-dir", str(tmp_path / "run")])
    assert ZERO_COUNT_WARNING in caplog.messages
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["count_check"]["start"] == 0 and ZERO_COUNT_WARNING in report["warnings"]
    assert report["settings"]["loss_row"] == "label-prefix"
    assert f"WARNING: {ZERO_COUNT_WARNING}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "abft_config.json").read_text())["settings"]["loss_row"] == "label-prefix"


def test_label_words_that_share_a_read_out_token_are_refused():
    """A lowercasing tokenizer reads "Good" and "good" as one token: two classes with one read-out are refused."""
    from tokenizers import normalizers

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    for style in ("staicc", "space-on-label"):
        with pytest.raises(ValueError, match=r"label words \['Good', 'good'\] map to the same read-out token"):
            PromptBuilder(tokenizer, Template("review: ", "sentiment:", ("Good", "good")), style=style)
