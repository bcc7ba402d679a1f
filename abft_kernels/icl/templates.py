"""Prompt templates and label words of the paper's eight datasets, as StaICC builds them.

StaICC (Cho et al., arXiv 2501.15708) writes a demonstration as
`<input_prefix><text> <label_prefix><label word>\n` and ends the prompt with the query's
`<input_prefix><text> <label_prefix>`. Here `label_prefix` is stored without its trailing space: the
space belongs to the label token (" positive"), so every label word is one token and the model
predicts it as the next token after the query's "sentiment:". The label words are StaICC's
reduced label spaces (one short word per class).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Template:
    """How one classification dataset becomes ICL prompts. Class id i is written as label_words[i]."""

    input_prefix: str  # "review: "
    label_prefix: str  # "sentiment:" (the label token carries the leading space)
    label_words: Tuple[str, ...]  # one word per class id, no leading space
    instruction: str = ""  # text before the first demonstration

    def demonstration(self, text: str, label: int) -> str:
        return f"{self.input_prefix}{text} {self.label_prefix} {self.label_words[label]}\n"

    def query(self, text: str) -> str:
        return f"{self.input_prefix}{text} {self.label_prefix}"

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
