"""Tasks: examples, templates, built-in data, resource-backed and generated tasks, file loaders and
demonstration samplers."""

from .base import METRICS, Example, FramedTemplate, Metric, Task, TaskKind, Template
from .builtin import (
    TEMPLATES,
    TaskInfo,
    get_task,
    get_template,
    is_builtin,
    laid_over,
    list_tasks,
    reference_prompts,
    register_task,
    resolve_task,
    task_table,
)
from .draws import draw_resamples, draw_sets, set_queries
from .loaders import TaskDataError, check_enough, load_examples, load_hf_dataset, load_task
from .resources import MissingResourceError
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
    get_sampler,
    register_sampler,
)

__all__ = [
    "Example",
    "Template",
    "FramedTemplate",
    "Task",
    "TaskKind",
    "Metric",
    "METRICS",
    "TaskDataError",
    "MissingResourceError",
    "load_task",
    "load_examples",
    "load_hf_dataset",
    "check_enough",
    "get_task",
    "is_builtin",
    "laid_over",
    "resolve_task",
    "list_tasks",
    "task_table",
    "TaskInfo",
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
    "draw_sets",
    "set_queries",
]
