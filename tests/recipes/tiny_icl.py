"""Offline ICL fixtures: a tiny byte-level word tokenizer (GPT-2's pre-tokenizer, a word-level vocabulary) and a
tiny random Llama on it, and StaICC-format data files, so that the tests need neither the network nor the wheels."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch

WORDS = ("review", "sentence", "sentiment", "label", "Label", "movie", "film", "good", "bad", "great", "dull", "plot",
         "a", "the", "is", "was", "very", "not", "N/A", "negative", "positive", "neutral", "Q")


def tiny_tokenizer():
    """A fast tokenizer with GPT-2's byte-level pre-tokenization ("sentiment: positive\\n" -> 'Ġsentiment', ':',
    'Ġpositive', 'Ċ'; a trailing space is its own token 'Ġ') and a word-level vocabulary: every word of WORDS,
    bare and after a space, plus punctuation; anything else is [UNK]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["[UNK]", "<pad>", ":", "Ġ", "Ċ", "ĉ", "Ġ:", "[", "]", "MASK", "Ġ[", "Ġ.", ".",
              "Ġmeh"]  # "meh" only after a space
    pieces += [p for w in WORDS for p in (w, "Ġ" + w)]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama (4 query / 2 key-value heads, hidden size 32) in float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def write_staicc_files(root: Path, name: str, rows: Sequence[Dict], template: Dict, label_space: List[str],
                       calibration: List[int], demonstration: List[int], test: List[int],
                       demo_pos: List[List[int]], paper_name: str = "TINY") -> Path:
    """splits.json and <name>.jsonl in the StaICC export's format; prompt j tests position j % len(test)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompts = [dict(test_pos=j % len(test), test_row=test[j % len(test)], demo_pos=pos,
                    demo_rows=[demonstration[p] for p in pos]) for j, pos in enumerate(demo_pos)]
    spec = dict(paper_name=paper_name, staicc_name=name, file=f"{name}.jsonl", n_rows=len(rows),
                label_space=label_space, label_mapping={str(i): i for i in range(len(label_space))},
                ground_truth_label_names=None, template=template, use_noisy_channel=False, label_wrong_rate=0,
                k=len(demo_pos[0]), repeat_times=len(demo_pos) // len(test),
                split_sizes=dict(calibration=len(calibration), demonstration=len(demonstration), test=len(test)),
                calibration_rows=calibration, demonstration_rows=demonstration, test_rows=test, prompts=prompts)
    (root / "splits.json").write_text(json.dumps(dict(source={}, how="test", prompt_order="", datasets={name: spec})),
                                      encoding="utf-8")
    return root


def write_staicc_diag(root: Path, name: str, templates: List[Dict], label_space: List[str], test: List[int],
                      demonstration: List[int], demo_pos: List[List[int]]) -> Path:
    """diag.json of the StaICC export with a template-consistency entry: test item i with demonstrations
    demo_pos[i] under every template."""
    prompts = [dict(test_pos=i, test_row=test[i], demo_pos=pos, demo_rows=[demonstration[p] for p in pos])
               for i, pos in enumerate(demo_pos)]
    spec = dict(templates=[dict(t, label_space=label_space) for t in templates], prompts=prompts)
    (root / "diag.json").write_text(json.dumps(dict(source={}, template_consistency=dict(datasets={name: spec}))),
                                    encoding="utf-8")
    return root
