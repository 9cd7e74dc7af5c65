"""Built-in tasks (project-written data shipped in ``iclit/tasks/data``) and the task registry.

>>> task = get_task("sentiment")                      # a built-in, by name
>>> task = get_task("my_data.csv", input_field="review", output_field="label")  # a file
>>> plain = task.with_template(task.template.replace(instruction=None))        # no instruction
>>> qa = task.with_template(get_template("sentiment", "qa"))                   # another template
>>> own = get_task("my_data.csv", template={"instruction": "Positive or negative?", "input_prefix": "Review: "})
>>> task = resolve_task("sentiment", "qa", instruction=False)                    # what a spec's cell uses
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from .base import Example, Task, Template
from .loaders import SUPPORTED_EXTENSIONS, TaskDataError, load_examples, load_task

__all__ = [
    "TEMPLATES",
    "register_task",
    "list_tasks",
    "get_task",
    "is_builtin",
    "resolve_task",
    "laid_over",
    "get_template",
    "reference_prompts",
]

TaskFactory = Callable[[], Task]

# task name -> template name -> template. "default" is the one a built-in task comes with.
TEMPLATES: dict[str, dict[str, Template]] = {
    "sentiment": {
        "default": Template(
            name="default",
            instruction="Classify the sentiment of the review as positive or negative.",
            input_prefix="Review: ",
            output_prefix="Sentiment:",
        ),
        "qa": Template(
            name="qa",
            input_prefix="Text: ",
            output_prefix="Is the text positive or negative? Answer:",
        ),
    },
    "translation-en-cs": {
        "default": Template(
            name="default",
            instruction="Translate the English sentence into Czech.",
            input_prefix="English: ",
            output_prefix="Czech:",
        ),
        "short": Template(
            name="short",
            input_prefix="EN: ",
            output_prefix="CS:",
        ),
    },
}

# name -> (factory, description); filled by register_task.
_TASKS: dict[str, tuple[TaskFactory, str]] = {}


@functools.cache
def _builtin(name: str) -> Task:
    """Build a registered task once; tasks are frozen, so sharing is safe."""
    return _TASKS[name][0]()


def register_task(name: str, factory: TaskFactory, description: str = "") -> None:
    """Add (or replace) a named task; ``factory()`` builds it on first use."""
    _TASKS[name] = (factory, description)
    _builtin.cache_clear()


def get_template(task_name: str, template_name: str = "default") -> Template:
    """A registered template of a task (see :data:`TEMPLATES`)."""
    if task_name not in TEMPLATES:
        raise TaskDataError(f"no templates for task {task_name!r} (tasks with templates: {sorted(TEMPLATES)})")
    options = TEMPLATES[task_name]
    if template_name not in options:
        raise TaskDataError(f"task {task_name!r} has no template {template_name!r} (templates: {sorted(options)})")
    return options[template_name]


def _data_file(filename: str) -> Any:
    return resources.files("iclit.tasks").joinpath("data", filename)


def _load_packaged(filename: str, **kwargs: Any) -> list[Example]:
    with resources.as_file(_data_file(filename)) as path:
        return load_examples(path, **kwargs)


def _sentiment() -> Task:
    labels = ("negative", "positive")
    examples = _load_packaged(
        "sentiment.jsonl",
        input_field="text",
        output_field="label",
        id_field="id",
        labels=labels,
        meta_fields=("domain",),
    )
    return Task(
        name="sentiment",
        kind="classification",
        examples=tuple(examples),
        template=TEMPLATES["sentiment"]["default"],
        labels=labels,
        description=_TASKS["sentiment"][1],
    )


def _translation_en_cs() -> Task:
    examples = _load_packaged(
        "translation_en_cs.jsonl", input_field="en", output_field="cs", id_field="id", meta_fields=()
    )
    return Task(
        name="translation-en-cs",
        kind="generation",
        examples=tuple(examples),
        template=TEMPLATES["translation-en-cs"]["default"],
        labels=None,
        description=_TASKS["translation-en-cs"][1],
    )


register_task(
    "sentiment",
    _sentiment,
    "binary sentiment of short movie and product reviews (positive / negative, balanced)",
)
register_task(
    "translation-en-cs",
    _translation_en_cs,
    "English to Czech translation of everyday sentences",
)


def list_tasks() -> list[tuple[str, str, int, str]]:
    """``(name, kind, number of examples, description)`` for each registered task."""
    rows = []
    for name, (_, description) in _TASKS.items():
        task = _builtin(name)
        rows.append((name, task.kind, len(task.examples), description))
    return rows


def is_builtin(name: str | Path) -> bool:
    """Whether ``name`` is a registered task (not a file)."""
    return str(name) in _TASKS


def laid_over(template: Template, fields: Template | Mapping[str, Any]) -> Template:
    """``fields`` (a mapping of :class:`Template` fields) laid over ``template``; a Template replaces it."""
    if isinstance(fields, Template):
        return fields
    known = [f.name for f in dataclasses.fields(Template)]
    unknown = [k for k in fields if k not in known]
    if unknown:
        raise TaskDataError(f"unknown template field {unknown[0]!r} (fields: {', '.join(known)})")
    return template.replace(**fields)


def get_task(name_or_path: str | Path, *, template: Template | Mapping[str, Any] | None = None,
             **loader_kwargs: Any) -> Task:
    """A registered task by name, or a task file (``.jsonl``/``.csv``/``.parquet``, …).

    ``loader_kwargs`` go to :func:`~iclit.tasks.loaders.load_task` and apply to files only.
    ``template``: the task's template, a :class:`Template` or a mapping of its fields laid
    over the task's own (a file's own is :data:`~iclit.tasks.loaders.DEFAULT_TEMPLATE`).
    """
    key = str(name_or_path)
    if key in _TASKS:
        if loader_kwargs:
            raise TaskDataError(
                f"task {key!r} is built in; loader options {sorted(loader_kwargs)} apply only to files"
            )
        task = _builtin(key)
    else:
        path = Path(key)
        if not (path.is_file() or path.suffix.lower() in SUPPORTED_EXTENSIONS):
            raise TaskDataError(
                f"unknown task {key!r}: not a built-in task ({', '.join(sorted(_TASKS))}) and not an existing file; "
                f"a path to a {'/'.join(SUPPORTED_EXTENSIONS)} file works too"
            )
        task = load_task(path, **loader_kwargs)
    return task if template is None else task.with_template(laid_over(task.template, template))


def resolve_task(task: str | Path | Task, template: str | None = None, instruction: bool = True, *,
                 options: Mapping[str, Any] | None = None) -> Task:
    """A task by name, path or object (``options``: :func:`get_task`'s keyword arguments, a
    spec's ``task_options``) with a named template (``None``/``"default"``: its own) and
    without its instruction if ``instruction`` is false."""
    t = task if isinstance(task, Task) else get_task(task, **(options or {}))
    if template not in (None, "default"):
        t = t.with_template(get_template(t.name, template))
    if not instruction:
        t = t.with_template(t.template.replace(instruction=None))
    return t


@functools.cache
def _reference_prompts() -> tuple[str, ...]:
    path = _data_file("reference.jsonl")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                prompts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError) as e:
                raise TaskDataError(f"{path} line {lineno}: bad reference prompt ({e})") from None
    return tuple(prompts)


def reference_prompts() -> list[str]:
    """Neutral, task-unrelated prompts (``reference.jsonl``) for the anisotropy baseline."""
    return list(_reference_prompts())
