"""In-context-learning prompts for ABFT: templates of the paper's datasets, loaders, token-level prompts."""
from .data import BUILTIN_TASKS, DEFAULT_TASK, Example, ICLTask, load_task
from .prompts import ICLCollator, ICLPrompt, PromptBuilder, sample_prompts, training_prompts
from .templates import PAPER_TASKS, Template

__all__ = [
    "BUILTIN_TASKS", "DEFAULT_TASK", "Example", "ICLCollator", "ICLPrompt", "ICLTask", "PAPER_TASKS",
    "PromptBuilder", "Template", "load_task", "sample_prompts", "training_prompts",
]
