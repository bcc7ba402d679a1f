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

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple


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
class TemplateFactors:
    """The options of the four template factors that StaICC's template-consistency diagnostic varies, three each;
    option 0 of every factor is the dataset's default template. Prefixes are written as in `Template` (the label
    prefix without its trailing space)."""

    instructions: Tuple[str, str, str]
    input_prefixes: Tuple[str, str, str]
    label_prefixes: Tuple[str, str, str]
    label_affixes: Tuple[str, str, str] = ("\n", " ", "\t")


# StaICC's L9(3^4) orthogonal array: 9 templates in which every pair of factors takes all 9 option pairs once.
ORTHOGONAL_L9 = ((0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1), (2, 0, 2, 1),
                 (2, 1, 0, 2), (2, 2, 1, 0))


def template_variants(template: Template, factors: TemplateFactors) -> List[Template]:
    """The 9 templates of the template-consistency diagnostic: `template` with (instruction, input prefix, label
    prefix, label affix) set by each row of ORTHOGONAL_L9; the label words and the rest stay.

    Source: StaICC `Template_sens` (hc495/StaICC), used by the ABFT paper (arXiv 2505.14233) §6, consistency.

    Raises:
        ValueError: `template` is not option 0 of every factor (a custom template has no variants).
    """
    default = (template.instruction, template.input_prefix, template.label_prefix, template.label_affix)
    first = (factors.instructions[0], factors.input_prefixes[0], factors.label_prefixes[0], factors.label_affixes[0])
    if default != first:
        raise ValueError(f"template consistency varies the dataset's default template {first}, but the template is "
                         f"{default}: a custom template has no variants")
    return [replace(template, instruction=factors.instructions[a], input_prefix=factors.input_prefixes[b],
                    label_prefix=factors.label_prefixes[c], label_affix=factors.label_affixes[d])
            for a, b, c, d in ORTHOGONAL_L9]


@dataclass(frozen=True)
class PaperTask:
    template: Template
    hub: HubDataset
    factors: TemplateFactors  # StaICC's template-consistency options (its diag data, commit 9d13532)


SENTIMENT = ("negative", "positive")

# The paper's eight datasets (ABFT §5, StaICC's templates, reduced label spaces and template-consistency options).
_SENTIMENT_QUESTION = "How would you describe the overall feeling of the movie based on this sentence? "
_SENTIMENT_REQUEST = "Please classify the sentiment of the following sentence. "
PAPER_TASKS: Dict[str, PaperTask] = {
    "sst2": PaperTask(Template("sentence: ", "sentiment:", SENTIMENT),
                      HubDataset("nyu-mll/glue", "sst2", text_column="sentence"),
                      TemplateFactors(("", _SENTIMENT_QUESTION, _SENTIMENT_REQUEST),
                                      ("sentence: ", "text: ", "review: "), ("sentiment:", "label:", "Label:"))),
    "mr": PaperTask(Template("review: ", "sentiment:", SENTIMENT),
                    HubDataset("cornell-movie-review-data/rotten_tomatoes"),
                    TemplateFactors(("", _SENTIMENT_QUESTION, _SENTIMENT_REQUEST),
                                    ("review: ", "text: ", "sentence: "), ("sentiment:", "label:", "Label:"))),
    "fp": PaperTask(Template("sentence: ", "sentiment:", ("negative", "neutral", "positive")),
                    HubDataset("takala/financial_phrasebank", "sentences_allagree", text_column="sentence"),
                    TemplateFactors(("", "What is the attitude towards the financial news in this sentence? ",
                                     "What is the emotional response to the financial news in this sentence? "),
                                    ("sentence: ", "text: ", "news: "), ("sentiment:", "label:", "Label:"))),
    "sst5": PaperTask(Template("sentence: ", "sentiment:", ("poor", "bad", "neutral", "good", "great")),
                      HubDataset("SetFit/sst5"),
                      TemplateFactors(("", _SENTIMENT_QUESTION, "What mood does this sentence convey about the movie? "),
                                      ("sentence: ", "text: ", "review: "), ("sentiment:", "label:", "Label:"))),
    "trec": PaperTask(Template("question: ", "target:", ("short", "entity", "description", "person", "location",
                                                         "number")),
                      HubDataset("CogComp/trec", splits=("train", "test"), label_column="coarse_label"),
                      TemplateFactors(("", "What is the topic of the question? ",
                                       "What is the primary focus of this question? "),
                                      ("question: ", "text: ", "sentence: "), ("target:", "label:", "Label:"))),
    "subj": PaperTask(Template("review: ", "subjectiveness:", ("false", "true")),  # 0 objective, 1 subjective
                      HubDataset("SetFit/subj"),
                      TemplateFactors(("", "Does this sentence reflect a personal opinion? ",
                                       "Is this sentence expressing a personal opinion or stating a fact? "),
                                      ("review: ", "text: ", "sentence: "), ("subjectiveness:", "label:", "Label:"))),
    "tee": PaperTask(Template("tweet: ", "emotion:", ("anger", "joy", "positive", "sad")),
                     HubDataset("cardiffnlp/tweet_eval", "emotion", splits=("train", "validation", "test")),
                     TemplateFactors(("", "What feeling does this sentence convey? ",
                                      "What emotion does this sentence express? "),
                                     ("tweet: ", "text: ", "sentence: "), ("emotion:", "label:", "Label:"))),
    "teh": PaperTask(Template("tweet: ", "hate speech:", ("normal", "hate")),
                     HubDataset("cardiffnlp/tweet_eval", "hate"),
                     TemplateFactors(("", "Does this sentence contain hate speech? ",
                                      "Is this sentence an example of hate speech? "),
                                     ("tweet: ", "text: ", "sentence: "), ("hate speech:", "label:", "Label:"))),
}
