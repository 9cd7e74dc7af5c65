"""Tasks: examples, templates, built-in data, file loaders and demonstration samplers."""

from .base import Example, Task, TaskKind, Template
from .builtin import TEMPLATES, get_task, get_template, list_tasks, reference_prompts, register_task
from .loaders import TaskDataError, check_enough, load_examples, load_hf_dataset, load_task
from .samplers import (
    SAMPLERS,
    BalancedSampler,
    LeastSimilarSampler,
    MostSimilarSampler,
    RandomSampler,
    Resample,
    Sampler,
    SimilaritySampler,
    WrongLabelSampler,
    draw_resamples,
    get_sampler,
    register_sampler,
)

__all__ = [
    "Example",
    "Template",
    "Task",
    "TaskKind",
    "TaskDataError",
    "load_task",
    "load_examples",
    "load_hf_dataset",
    "check_enough",
    "get_task",
    "list_tasks",
    "register_task",
    "get_template",
    "TEMPLATES",
    "reference_prompts",
    "Resample",
    "Sampler",
    "RandomSampler",
    "BalancedSampler",
    "SimilaritySampler",
    "MostSimilarSampler",
    "LeastSimilarSampler",
    "WrongLabelSampler",
    "SAMPLERS",
    "register_sampler",
    "get_sampler",
    "draw_resamples",
]
