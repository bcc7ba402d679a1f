"""Token-level ICL prompts: k demonstrations + query, with the positions and classes of the label tokens.

Two prompt styles (`PROMPT_STYLES`), with identical demonstrations (`sentiment: positive\n`):

* `"staicc"` (StaICC's default, the paper's setting): the query ends with the label prefix AND its trailing
  space (`... sentiment: `). The read-out token of each class is the bare label word's last token,
  `tokenizer(word).input_ids[-1]`, as StaICC's `standard_ICL_inference_with_torch_Causal_LM` reads it.
* `"space-on-label"` (StaICC's optional "space moved onto the label" mode): the query ends at `sentiment:` and
  the read-out token is the label word with its leading space (`" positive"`), the token that the
  demonstrations carry in context.

Two rows of the query (`LOSS_ROWS`):

* read-out row (`ICLPrompt.query_row`): the prompt's last token in both styles (in "staicc" style on byte-level
  BPE tokenizers such as GPT-2's or SmolLM2's, the trailing space " " after "sentiment:"). Its next-token logits
  give the read-out, i.e. where the model predicts the label.
* loss row (`ICLPrompt.loss_row`): the row whose label attention masses the ABFT loss and the induction-head filter
  read. "label-prefix" (default): the token of the query's last character as the template writes it, the ':' of
  "sentiment:". That is the authors' row: the paper's Fig. 1 points at "the last ':'", and the authors' analysis
  code (hc495/ICL_Circuit, util/inference.py) reads row -2 of StaICC prompts, i.e. the colon before the trailing
  space. "read-out": the read-out row. In "space-on-label" style both are the ':'; in "staicc" style they differ.

Special tokens that the tokenizer's post-processor appends after the text (Llama-2 tokenizers with
add_eos_token=True append </s>) are dropped from the prompt: the read-out row is the template's own last token.
Leading ones (BOS) are kept.

Label positions: the prompt is tokenized as one string (what the model would see anyway); each
demonstration's label word is located through the tokenizer's character offsets and must be covered by
exactly one token (on BPE tokenizers " positive", the word with the space before it): that token carries the
demonstration's class for the loss, in both styles. In "space-on-label" style it is the read-out token itself;
in "staicc" style the read-out token is the bare word's (e.g. "positive" without the space), a different token.
A label word that does not map to one read-out token and one label token raises ValueError naming it.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .data import Example
from .templates import Template

PROMPT_STYLES = ("staicc", "space-on-label")
LOSS_ROWS = ("label-prefix", "read-out")


@dataclass(frozen=True)
class ICLPrompt:
    input_ids: List[int]
    label_positions: List[int]  # token index of each demonstration's label token
    label_classes: List[int]  # its class id
    gold: int  # the query's class id
    loss_row: int  # token index of the row the loss and the induction-head filter read (PromptBuilder's loss_row)

    @property
    def query_row(self) -> int:
        """The read-out row: the last token, whose next-token logits give the prediction."""
        return len(self.input_ids) - 1


class PromptBuilder:
    """Builds `ICLPrompt`s for one template on one tokenizer (a fast tokenizer: offsets are needed).

    Args:
        tokenizer: a transformers fast tokenizer.
        template: the dataset's `Template`.
        style: one of `PROMPT_STYLES`; "space-on-label" (this class's historical behaviour) by default, while
            StaICC's and the paper's default is "staicc".
        loss_row: one of `LOSS_ROWS`, the row of each prompt's `loss_row`: "label-prefix" (default, the authors'
            row: the token of the query's last template character, the ':' of "sentiment:") or "read-out" (the
            prompt's last token; in "staicc" style the trailing space). See the module docstring for the evidence.

    Attributes:
        label_token_ids: per class id, the read-out token (next-token logit at the query row).
        demonstration_token_ids: per class id, the token that carries the label word inside a demonstration.

    Raises:
        ValueError: a slow tokenizer, an unknown style or loss row, a label word whose read-out token is a special
            token or shared with another word, that is not exactly one token inside a demonstration, or (in "staicc"
            style) that the tokenizer splits into several tokens without its leading space.
    """

    def __init__(self, tokenizer, template: Template, style: str = "space-on-label", loss_row: str = "label-prefix"):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("tokenizer must be a fast (Rust) tokenizer: label tokens are found by character offsets")
        if style not in PROMPT_STYLES:
            raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
        if loss_row not in LOSS_ROWS:
            raise ValueError(f"loss_row must be one of {LOSS_ROWS}, got {loss_row!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.style = style
        self.loss_row = loss_row
        self.demonstration_token_ids = [self._demonstration_token_id(label) for label in range(template.num_classes)]
        if style == "staicc":
            self._refuse_split_bare_words()
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

    def _refuse_split_bare_words(self) -> None:
        """The "staicc" read-out is the bare word's token; the paper reduces every label word to one token (its
        Table 5), so a word the tokenizer splits without its leading space (SmolLM2: "sad" -> "s", "ad", where
        StaICC's `tokenizer(word).input_ids[-1]` would read "ad") is refused, all such words named at once."""
        split = {word: self.tokenizer.convert_ids_to_tokens(self.tokenizer(word, add_special_tokens=False)["input_ids"])
                 for word in self.template.label_words}
        split = {word: pieces for word, pieces in split.items() if len(pieces) > 1}
        if split:
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise ValueError(
                f"label words {sorted(split)} are split by the tokenizer {name!r} "
                f"({', '.join(f'{w!r} -> {p}' for w, p in split.items())}): the 'staicc' style reads each class from "
                "the bare word's one token (the paper reduces every label word to one token), and reading a piece "
                "would score a different word; use the 'space-on-label' style (--prompt-style space-on-label), which "
                "reads each word with its leading space, or label words that are one token bare")

    def _bare_word_token_id(self, word: str) -> int:
        """StaICC's read-out token of `word`: the bare word's token (`tokenizer(word).input_ids[-1]` in StaICC; here
        without the tokenizer's added special tokens, so that an appended EOS is not read)."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] in self.tokenizer.all_special_ids:
            raise ValueError(f"label word {word!r}: tokenizer({word!r}) is the special token "
                             f"{self.tokenizer.convert_ids_to_tokens(ids)} (ids {ids}), so it has no read-out token in "
                             f"'staicc' style")
        return ids[-1]

    def _encode(self, text: str):
        """(input_ids, offsets) of `text` with the tokenizer's special tokens, less those its post-processor appends
        after the text (special tokens that cover no character at the end, e.g. Llama-2's </s> with
        add_eos_token=True): the prompt ends with the template's own last token."""
        encoding = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
        special = set(self.tokenizer.all_special_ids)
        while ids and ids[-1] in special and offsets[-1][0] == offsets[-1][1]:
            ids.pop()
            offsets.pop()
        return ids, offsets

    def _tokens_covering(self, text: str, spans):
        """For each character span, the index of the single token that covers it (None if not exactly one)."""
        ids, offsets = self._encode(text)
        positions = []
        for start, end in spans:
            covering = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
            whole = len(covering) == 1 and offsets[covering[0]][0] <= start and offsets[covering[0]][1] >= end
            positions.append(covering[0] if whole else None)
        return positions, ids

    def _compose(self, demonstrations: Sequence[Example], query_text: str):
        """The prompt string, the character spans of the demonstrations' label words, and their classes; the
        query's last template character (the ':' of the label prefix) is the last of the spans."""
        text = self.template.instruction
        spans, classes = [], []
        for demo in demonstrations:
            piece = self.template.demonstration(demo.text, demo.label)
            start, end = self._label_span(piece, demo.label)
            spans.append((len(text) + start, len(text) + end))
            classes.append(demo.label)
            text += piece
        text += self.template.query(query_text)
        spans.append((len(text) - 1, len(text)))
        if self.style == "staicc":
            text += " "
        return text, spans, classes

    def text(self, demonstrations: Sequence[Example], query: Example) -> str:
        """The prompt as one string (in "staicc" style, StaICC's prompt byte for byte)."""
        return self._compose(demonstrations, query.text)[0]

    def build(self, demonstrations: Sequence[Example], query: Example) -> ICLPrompt:
        """The tokenized prompt with its label positions and classes; the read-out row is its last token, the loss
        row as `loss_row` says (the token of the label prefix's last character, or the last token).

        Raises:
            ValueError: a demonstration's label word is not exactly its label token in context, or no single token
                covers the label prefix's last character.
        """
        text, spans, classes = self._compose(demonstrations, query.text)
        positions, ids = self._tokens_covering(text, spans)
        *positions, prefix_end = positions
        for position, label in zip(positions, classes):
            if position is None or ids[position] != self.demonstration_token_ids[label]:
                raise ValueError(f"a demonstration's label {self.template.label_words[label]!r} did not tokenize to "
                                 f"its label token in context (prompt: {text[:200]!r}...)")
        if prefix_end is None:
            raise ValueError(f"no single token covers the last character of the query's label prefix "
                             f"{self.template.label_prefix!r}, the 'label-prefix' loss row (prompt end: {text[-80:]!r})")
        loss_row = prefix_end if self.loss_row == "label-prefix" else len(ids) - 1
        return ICLPrompt(list(ids), positions, classes, query.label, loss_row)


def sample_prompts(builder: PromptBuilder, pool: Sequence[Example], queries: Sequence[Example], k: int,
                   seed: int, gold_demonstration: bool = False) -> List[ICLPrompt]:
    """One prompt per query, with k demonstrations drawn uniformly at random (not class-balanced) from
    `pool`, never the query itself; with `gold_demonstration`, drawn again until one of them has the query's class
    (uniform over the draws that do).

    Raises:
        ValueError: k outside [1, len(pool) - 1]; with gold_demonstration, a query whose class has no other example
            in the pool.
    """
    if k < 1 or k >= len(pool):
        raise ValueError(f"k must be in [1, {len(pool) - 1}] for a pool of {len(pool)} examples, got {k}")
    if gold_demonstration:
        per_class = Counter(example.label for example in pool)
        in_pool = {id(example) for example in pool}
        lonely = sorted({q.label for q in queries if per_class[q.label] - (id(q) in in_pool) < 1})
        if lonely:
            raise ValueError(f"gold_demonstration: class(es) {lonely} have a single example in the training pool, "
                             f"so a query of that class can have no demonstration of its class")
    rng = random.Random(seed)
    prompts = []
    for query in queries:
        while True:
            demos = [d for d in rng.sample(pool, k + 1) if d is not query][:k]
            if not gold_demonstration or any(d.label == query.label for d in demos):
                break
        prompts.append(builder.build(demos, query))
    return prompts


def training_prompts(builder: PromptBuilder, pool: Sequence[Example], k: int, num_prompts: int, seed: int,
                     gold_demonstration: bool = False) -> List[ICLPrompt]:
    """`num_prompts` prompts whose queries and demonstrations all come from the training pool.

    Args:
        builder: builds each prompt's tokens.
        pool: the training examples (queries and demonstrations).
        k: demonstrations per prompt.
        num_prompts: prompts to build (queries drawn with replacement).
        seed: queries are drawn with `seed`, demonstrations with seed + 1.
        gold_demonstration: False (the paper's): k demonstrations drawn uniformly. True: each prompt's
            demonstrations are drawn again until one of them has the query's class (`sample_prompts`). With more
            classes than demonstrations many uniform prompts have none (StaICC's TREC, 6 classes, k = 4: 43%), and
            on those the ABFT loss is A·S alone: it only pulls attention off the labels (docs/results.md, "Prompts
            without a gold demonstration").

    Raises:
        ValueError: from `sample_prompts`.
    """
    queries = random.Random(seed).choices(pool, k=num_prompts)
    return sample_prompts(builder, pool, queries, k, seed + 1, gold_demonstration=gold_demonstration)


class ICLCollator:
    """Pads a list of ICLPrompt on the right into the tensors ABFT needs:
    input_ids, attention_mask [B,N]; key_class [B,N] (-1 = not a label); query_rows (the read-out rows),
    loss_rows (the rows whose label masses the loss and filter read), target_class [B,1]."""

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
            "loss_rows": torch.tensor([[p.loss_row] for p in prompts]),
            "target_class": torch.tensor([[p.gold] for p in prompts]),
        }
