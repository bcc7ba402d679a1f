"""Token-level ICL prompts: k demonstrations + query, with the positions and classes of the label tokens.

The prompt is tokenized as one string (what the model would see anyway); each demonstration's label
word is then located through the tokenizer's character offsets and checked to be exactly the label
word's single token. The query row is the last token (the query's "sentiment:"), whose next-token
logits over the label tokens are the paper's read-out.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .data import Example
from .templates import Template


@dataclass(frozen=True)
class ICLPrompt:
    input_ids: List[int]
    label_positions: List[int]  # token index of each demonstration's label token
    label_classes: List[int]  # its class id
    gold: int  # the query's class id

    @property
    def query_row(self) -> int:
        return len(self.input_ids) - 1


class PromptBuilder:
    """Builds `ICLPrompt`s for one template on one tokenizer (a fast tokenizer: offsets are needed)."""

    def __init__(self, tokenizer, template: Template):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("tokenizer must be a fast (Rust) tokenizer: label tokens are found by character offsets")
        self.tokenizer = tokenizer
        self.template = template
        self.label_token_ids = [self._label_token_id(label) for label in range(template.num_classes)]
        if len(set(self.label_token_ids)) != len(self.label_token_ids):
            raise ValueError(f"label words {template.label_words} do not map to distinct tokens")

    def _label_span(self, demonstration: str, label: int) -> Tuple[int, int]:
        """Character span of the label word in `demonstration` (the space before it belongs to the token)."""
        word = self.template.label_words[label]
        start = demonstration.rindex(f" {word}\n") + 1
        return start, start + len(word)

    def _label_token_id(self, label: int) -> int:
        """The one token that class `label`'s word becomes after the label prefix, in context: the token that
        directly follows the prefix's tokens, as the read-out at the query's last token needs."""
        text = self.template.demonstration("a", label)
        start, end = self._label_span(text, label)
        positions, ids = self._tokens_covering(text, [(start, end)])
        word = self.template.label_words[label]
        if positions[0] is None:
            raise ValueError(f"label word {word!r} is not a single token for this tokenizer; choose label words "
                             f"that are (e.g. check tokenizer.encode(' {word}'))")
        full = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = self.tokenizer(text[:start - 1], add_special_tokens=False)["input_ids"]
        if full[:len(prefix)] != prefix or full[len(prefix):len(prefix) + 1] != [ids[positions[0]]]:
            between = self.tokenizer.convert_ids_to_tokens(full[len(prefix):len(prefix) + 2])
            raise ValueError(
                f"label word {word!r}: after {self.template.label_prefix!r} this tokenizer gives {between}, so the "
                "token the model predicts after a prompt is not the label word's token (e.g. SentencePiece/Metaspace "
                "tokenizers make the leading space a separate token); choose label words that are one token "
                f"together with their leading space (check tokenizer.tokenize('{self.template.label_prefix} {word}'))")
        return ids[positions[0]]

    def _tokens_covering(self, text: str, spans):
        """For each character span, the index of the single token that covers it (None if not exactly one)."""
        encoding = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        positions = []
        for start, end in spans:
            covering = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
            whole = len(covering) == 1 and offsets[covering[0]][0] <= start and offsets[covering[0]][1] >= end
            positions.append(covering[0] if whole else None)
        return positions, ids

    def build(self, demonstrations: Sequence[Example], query: Example) -> ICLPrompt:
        text = self.template.instruction
        spans, classes = [], []
        for demo in demonstrations:
            piece = self.template.demonstration(demo.text, demo.label)
            start, end = self._label_span(piece, demo.label)
            spans.append((len(text) + start, len(text) + end))
            classes.append(demo.label)
            text += piece
        text += self.template.query(query.text)
        positions, ids = self._tokens_covering(text, spans)
        for position, label in zip(positions, classes):
            if position is None or ids[position] != self.label_token_ids[label]:
                raise ValueError(f"a demonstration's label {self.template.label_words[label]!r} did not tokenize to "
                                 f"its label token in context (prompt: {text[:200]!r}...)")
        return ICLPrompt(list(ids), positions, classes, query.label)


def sample_prompts(builder: PromptBuilder, pool: Sequence[Example], queries: Sequence[Example], k: int,
                   seed: int) -> List[ICLPrompt]:
    """One prompt per query, with k demonstrations drawn uniformly at random (not class-balanced) from
    `pool`, never the query itself."""
    if k < 1 or k >= len(pool):
        raise ValueError(f"k must be in [1, {len(pool) - 1}] for a pool of {len(pool)} examples, got {k}")
    rng = random.Random(seed)
    prompts = []
    for query in queries:
        demos = rng.sample(pool, k + 1)
        demos = [d for d in demos if d is not query][:k]
        prompts.append(builder.build(demos, query))
    return prompts


def training_prompts(builder: PromptBuilder, pool: Sequence[Example], k: int, num_prompts: int,
                     seed: int) -> List[ICLPrompt]:
    """`num_prompts` prompts whose queries and demonstrations all come from the training pool."""
    queries = random.Random(seed).choices(pool, k=num_prompts)
    return sample_prompts(builder, pool, queries, k, seed + 1)


class ICLCollator:
    """Pads a list of ICLPrompt on the right into the tensors ABFT needs:
    input_ids, attention_mask [B,N]; key_class [B,N] (-1 = not a label); query_rows, target_class [B,1]."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, prompts: Sequence[ICLPrompt]) -> Dict[str, torch.Tensor]:
        batch, length = len(prompts), max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        key_class = torch.full((batch, length), -1, dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, :len(p.input_ids)] = torch.tensor(p.input_ids)
            attention_mask[b, :len(p.input_ids)] = 1
            key_class[b, p.label_positions] = torch.tensor(p.label_classes)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "key_class": key_class,
            "query_rows": torch.tensor([[p.query_row] for p in prompts]),
            "target_class": torch.tensor([[p.gold] for p in prompts]),
        }
