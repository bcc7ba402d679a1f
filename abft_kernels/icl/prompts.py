"""Token-level ICL prompts: k demonstrations + query, with the positions and classes of the label tokens.

Two prompt styles (`PROMPT_STYLES`), with identical demonstrations (`sentiment: positive\n`):

* `"staicc"` (StaICC's default, the paper's setting): the query ends with the label prefix AND its trailing
  space (`... sentiment: `). The read-out token of each class is the bare label word's last token,
  `tokenizer(word).input_ids[-1]`, as StaICC's `standard_ICL_inference_with_torch_Causal_LM` reads it.
* `"space-on-label"` (StaICC's optional "space moved onto the label" mode): the query ends at `sentiment:` and
  the read-out token is the label word with its leading space (`" positive"`), the token that the
  demonstrations carry in context.

Query row: the prompt's last token in both styles (in "staicc" style on byte-level BPE tokenizers such as
GPT-2's or SmolLM2's, the trailing space " " after "sentiment:"). It is the position whose next-token logits
give the read-out, i.e. where the model predicts the label, so it is the row whose attention ABFT steers.

Label positions: the prompt is tokenized as one string (what the model would see anyway); each
demonstration's label word is located through the tokenizer's character offsets and must be covered by
exactly one token (on BPE tokenizers " positive", the word with the space before it): that token carries the
demonstration's class for the loss, in both styles. In "space-on-label" style it is the read-out token itself;
in "staicc" style the read-out token is the bare word's (e.g. "positive" without the space), a different token.
A label word that does not map to one read-out token and one label token raises ValueError naming it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .data import Example
from .templates import Template

PROMPT_STYLES = ("staicc", "space-on-label")


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
    """Builds `ICLPrompt`s for one template on one tokenizer (a fast tokenizer: offsets are needed).

    Args:
        tokenizer: a transformers fast tokenizer.
        template: the dataset's `Template`.
        style: one of `PROMPT_STYLES`; "space-on-label" (this class's historical behaviour) by default, while
            StaICC's and the paper's default is "staicc".

    Attributes:
        label_token_ids: per class id, the read-out token (next-token logit at the query row).
        demonstration_token_ids: per class id, the token that carries the label word inside a demonstration.

    Raises:
        ValueError: a slow tokenizer, an unknown style, a label word whose read-out token is a special token or
            shared with another word, or that is not exactly one token inside a demonstration.
    """

    def __init__(self, tokenizer, template: Template, style: str = "space-on-label"):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("tokenizer must be a fast (Rust) tokenizer: label tokens are found by character offsets")
        if style not in PROMPT_STYLES:
            raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.style = style
        self.demonstration_token_ids = [self._demonstration_token_id(label) for label in range(template.num_classes)]
        if style == "staicc":
            self.label_token_ids = [self._bare_word_token_id(word) for word in template.label_words]
        else:
            self.label_token_ids = list(self.demonstration_token_ids)
        for token in self.label_token_ids:
            sharing = [w for w, t in zip(template.label_words, self.label_token_ids) if t == token]
            if len(sharing) > 1:
                raise ValueError(f"label words {sharing} map to the same read-out token "
                                 f"{tokenizer.convert_ids_to_tokens(token)!r} ({style!r} style)")

    def _label_span(self, demonstration: str, label: int) -> Tuple[int, int]:
        """Character span of the label word in `demonstration` (the word without the space before it)."""
        word = self.template.label_words[label]
        start = demonstration.rindex(f" {word}{self.template.label_affix}") + 1
        return start, start + len(word)

    def _demonstration_token_id(self, label: int) -> int:
        """The one token that class `label`'s word becomes after the label prefix, in context. In the
        "space-on-label" style it is also the read-out, so it must be the token that directly follows the prefix's
        tokens (what the model predicts at the query's last token)."""
        text = self.template.demonstration("a", label)
        start, end = self._label_span(text, label)
        positions, ids = self._tokens_covering(text, [(start, end)])
        word = self.template.label_words[label]
        if positions[0] is None:
            raise ValueError(f"label word {word!r} is not a single token for this tokenizer; choose label words "
                             f"that are (e.g. check tokenizer.encode(' {word}'))")
        if ids[positions[0]] in self.tokenizer.all_special_ids:
            raise ValueError(f"label word {word!r} becomes the special token "
                             f"{self.tokenizer.convert_ids_to_tokens(ids[positions[0]])!r} in a demonstration")
        if self.style == "staicc":  # the read-out is the bare word's own token (_bare_word_token_id)
            return ids[positions[0]]
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

    def _bare_word_token_id(self, word: str) -> int:
        """StaICC's read-out token of `word`: the last token of the bare word, `tokenizer(word).input_ids[-1]`.

        For a word the tokenizer splits (SmolLM2: "sad" -> "s", "ad") this is its last piece, as in StaICC."""
        ids = self.tokenizer(word)["input_ids"]
        if not ids or ids[-1] in self.tokenizer.all_special_ids:
            raise ValueError(f"label word {word!r}: tokenizer({word!r}) ends with a special token (ids {ids}), so it "
                             f"has no read-out token in 'staicc' style")
        return ids[-1]

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

    def _compose(self, demonstrations: Sequence[Example], query_text: str):
        """The prompt string, the character spans of the demonstrations' label words, and their classes."""
        text = self.template.instruction
        spans, classes = [], []
        for demo in demonstrations:
            piece = self.template.demonstration(demo.text, demo.label)
            start, end = self._label_span(piece, demo.label)
            spans.append((len(text) + start, len(text) + end))
            classes.append(demo.label)
            text += piece
        text += self.template.query(query_text)
        if self.style == "staicc":
            text += " "
        return text, spans, classes

    def text(self, demonstrations: Sequence[Example], query: Example) -> str:
        """The prompt as one string (in "staicc" style, StaICC's prompt byte for byte)."""
        return self._compose(demonstrations, query.text)[0]

    def build(self, demonstrations: Sequence[Example], query: Example) -> ICLPrompt:
        """The tokenized prompt with its label positions and classes; the query row is its last token.

        Raises:
            ValueError: a demonstration's label word is not exactly its label token in context.
        """
        text, spans, classes = self._compose(demonstrations, query.text)
        positions, ids = self._tokens_covering(text, spans)
        for position, label in zip(positions, classes):
            if position is None or ids[position] != self.demonstration_token_ids[label]:
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
            key_class[b, p.label_positions] = torch.tensor(p.label_classes, dtype=torch.long)  # [] for 0-shot
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "key_class": key_class,
            "query_rows": torch.tensor([[p.query_row] for p in prompts]),
            "target_class": torch.tensor([[p.gold] for p in prompts]),
        }
