"""Prompt templates and label words of the paper's eight datasets, as StaICC builds them.

StaICC (Cho et al., arXiv 2501.15708; hc495/StaICC, `prompt_writter.write_prompt_from_dataline`) writes
`<instruction>`, then per demonstration `<input prefix><text><input affix><label prefix><label word><label affix>`,
then `<query prefix><input prefix><query text><input affix><label prefix>`, with the label prefix ending in a
space (`"sentiment: "`) and bare label words (`"positive"`). Here `label_prefix` is stored without that
trailing space (`"sentiment:"`) and `demonstration()` writes it back before the label word, so the
demonstrations are StaICC's bytes; `query()` ends at the label prefix without the space, and the prompt
style (`PromptBuilder(style=...)`) decides whether the space follows (StaICC's default) or not (the label
token then carries the leading space: " positive"). The label words are StaICC's reduced label spaces
(one short word per class).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Template:
    """How one classification dataset becomes ICL prompts. Class id i is written as label_words[i]."""

    input_prefix: str  # "review: "
    label_prefix: str  # "sentiment:", without the space that separates it from the label word
    label_words: Tuple[str, ...]  # one word per class id, no leading space
    instruction: str = ""  # text before the first demonstration
    input_affix: str = " "  # between the input text and the label prefix
    label_affix: str = "\n"  # after each demonstration's label word
    query_prefix: str = ""  # before the query's input prefix

    def demonstration(self, text: str, label: int) -> str:
        return (f"{self.input_prefix}{text}{self.input_affix}{self.label_prefix} {self.label_words[label]}"
                f"{self.label_affix}")

    def query(self, text: str) -> str:
        """The query up to its label prefix, without the prefix's trailing space (the prompt style adds it)."""
        return f"{self.query_prefix}{self.input_prefix}{text}{self.input_affix}{self.label_prefix}"

    @property
    def num_classes(self) -> int:
        return len(self.label_words)


@dataclass(frozen=True)
class HubDataset:
    """Where a paper dataset lives on the Hugging Face hub and which columns hold text and label."""

    path: str
    config: Optional[str] = None
    splits: Tuple[str, ...] = ("train",)  # concatenated, as StaICC does
    text_column: str = "text"
    label_column: str = "label"


@dataclass(frozen=True)
class PaperTask:
    template: Template
    hub: HubDataset


SENTIMENT = ("negative", "positive")

# The paper's eight datasets (ABFT §5, StaICC's templates and reduced label spaces).
PAPER_TASKS: Dict[str, PaperTask] = {
    "sst2": PaperTask(Template("sentence: ", "sentiment:", SENTIMENT),
                      HubDataset("nyu-mll/glue", "sst2", text_column="sentence")),
    "mr": PaperTask(Template("review: ", "sentiment:", SENTIMENT),
                    HubDataset("cornell-movie-review-data/rotten_tomatoes")),
    "fp": PaperTask(Template("sentence: ", "sentiment:", ("negative", "neutral", "positive")),
                    HubDataset("takala/financial_phrasebank", "sentences_allagree", text_column="sentence")),
    "sst5": PaperTask(Template("sentence: ", "sentiment:", ("poor", "bad", "neutral", "good", "great")),
                      HubDataset("SetFit/sst5")),
    "trec": PaperTask(Template("question: ", "target:", ("short", "entity", "description", "person", "location",
                                                         "number")),
                      HubDataset("CogComp/trec", splits=("train", "test"), label_column="coarse_label")),
    "subj": PaperTask(Template("review: ", "subjectiveness:", ("false", "true")),  # 0 objective, 1 subjective
                      HubDataset("SetFit/subj")),
    "tee": PaperTask(Template("tweet: ", "emotion:", ("anger", "joy", "positive", "sad")),
                     HubDataset("cardiffnlp/tweet_eval", "emotion", splits=("train", "validation", "test"))),
    "teh": PaperTask(Template("tweet: ", "hate speech:", ("normal", "hate")),
                     HubDataset("cardiffnlp/tweet_eval", "hate")),
}
