"""In-context-learning prompts for ABFT: templates of the paper's datasets, loaders, token-level prompts."""
from .data import BUILTIN_TASKS, DEFAULT_TASK, Example, ICLTask, load_task
from .prompts import LOSS_ROWS, PROMPT_STYLES, ICLCollator, ICLPrompt, PromptBuilder, sample_prompts, training_prompts
from .staicc import STAICC_PREFIX, StaICCTask, is_staicc_source, load_staicc, staicc_prompts, staicc_template
from .templates import PAPER_TASKS, Template

__all__ = [
    "BUILTIN_TASKS", "DEFAULT_TASK", "Example", "ICLCollator", "ICLPrompt", "ICLTask", "LOSS_ROWS", "PAPER_TASKS",
    "PROMPT_STYLES", "PromptBuilder", "STAICC_PREFIX", "StaICCTask", "Template", "is_staicc_source", "load_staicc",
    "load_task", "sample_prompts", "staicc_prompts", "staicc_template", "training_prompts",
]
