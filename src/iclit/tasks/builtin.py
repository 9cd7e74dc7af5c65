"""Built-in tasks and the task registry.

Three kinds of built-in task: project-written data shipped in ``iclit/tasks/data``
(``sentiment``, ``translation-en-cs``), tasks read at run time from installed public
resources (:mod:`iclit.tasks.resources`: ``antonyms`` from WordNet,
``translation-en-cs-words`` from FreeDict) and tasks generated from a fixed seed
(:mod:`iclit.tasks.generated`: ``addition``, ``reverse-words``).

Example (not run: it needs a model or a run directory)::

    task = get_task("sentiment")                      # a built-in, by name
    task = get_task("my_data.csv", input_field="review", output_field="label")  # a file
    plain = task.with_template(task.template.replace(instruction=None))        # no instruction
    qa = task.with_template(get_template("sentiment", "qa"))                   # another template
    own = get_task("my_data.csv", template={"instruction": "Positive or negative?", "input_prefix": "Review: "})
    task = resolve_task("sentiment", "qa", instruction=False)                    # what a spec's cell uses

"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import generated
from . import resources as res
from .base import Example, Task, Template
from .loaders import SUPPORTED_EXTENSIONS, TaskDataError, load_examples, load_task

__all__ = [
    "TEMPLATES",
    "register_task",
    "list_tasks",
    "TaskInfo",
    "task_table",
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

TEMPLATES.update(
    {
        "antonyms": {
            "default": Template(
                name="default",
                instruction="Give the antonym (the word of opposite meaning) of the English adjective.",
                input_prefix="Word: ",
                output_prefix="Antonym:",
            ),
            "short": Template(name="short", input_prefix="Word: ", output_prefix="Opposite:"),
        },
        "translation-en-cs-words": {
            "default": Template(
                name="default",
                instruction="Translate the English word into Czech.",
                input_prefix="English: ",
                output_prefix="Czech:",
            ),
            "short": Template(name="short", input_prefix="EN: ", output_prefix="CS:"),
        },
        "addition": {
            "default": Template(
                name="default",
                instruction="Add the two numbers.",
                input_prefix="Question: ",
                output_prefix="Answer:",
            ),
            "short": Template(name="short", input_prefix="", output_prefix="="),
        },
        "reverse-words": {
            "default": Template(
                name="default",
                instruction="Write the words in reverse order.",
                input_prefix="Words: ",
                output_prefix="Reversed:",
            ),
            "short": Template(name="short", input_prefix="Input: ", output_prefix="Output:"),
        },
    }
)


@dataclass(frozen=True)
class _Registered:
    factory: TaskFactory
    description: str
    kind: str | None  # known without building the task (shown when its resource is missing)
    source: str


# name -> registration; filled by register_task.
_TASKS: dict[str, _Registered] = {}


@functools.cache
def _builtin(name: str) -> Task:
    """Build a registered task once; tasks are frozen, so sharing is safe."""
    return _TASKS[name].factory()


def register_task(
    name: str, factory: TaskFactory, description: str = "", *, kind: str | None = None, source: str = ""
) -> None:
    """Add (or replace) a named task; ``factory()`` builds it on first use.

    ``kind`` (``classification``/``generation``) and ``source`` (where the data comes from)
    are shown by :func:`task_table` even when the task cannot be built.
    """
    _TASKS[name] = _Registered(factory, description, kind, source)
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
        description=_TASKS["sentiment"].description,
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
        description=_TASKS["translation-en-cs"].description,
    )


def _exact(name: str, examples: list[Example], max_new_tokens: int) -> Task:
    """A generation task scored by exact match, with its default template."""
    return Task(
        name=name,
        kind="generation",
        examples=tuple(examples),
        template=TEMPLATES[name]["default"],
        description=_TASKS[name].description,
        metric="exact",
        max_new_tokens=max_new_tokens,
    )


def _antonyms() -> Task:
    return _exact("antonyms", res.antonym_examples(task="antonyms"), max_new_tokens=10)


def _translation_words() -> Task:
    return _exact(
        "translation-en-cs-words", res.translation_examples(task="translation-en-cs-words"), max_new_tokens=16
    )


def _addition() -> Task:
    return _exact("addition", generated.addition_examples(), max_new_tokens=6)


def _reverse_words() -> Task:
    return _exact("reverse-words", generated.reverse_words_examples(), max_new_tokens=24)


register_task(
    "sentiment",
    _sentiment,
    "binary sentiment of short movie and product reviews (positive / negative, balanced)",
    kind="classification",
    source="iclit (written for it)",
)
register_task(
    "translation-en-cs",
    _translation_en_cs,
    "English to Czech translation of everyday sentences",
    kind="generation",
    source="iclit (written for it)",
)
register_task(
    "antonyms",
    _antonyms,
    "antonym of an English adjective, exact match; one-to-one WordNet antonym pairs of plain "
    "2-12 letter words, both SemCor-tagged (see iclit/tasks/data/README.md)",
    kind="generation",
    source=f"WordNet 3.0 (Debian {res.WORDNET_PACKAGE})",
)
register_task(
    "translation-en-cs-words",
    _translation_words,
    "English word to Czech word, exact match; headwords with one single-word translation, "
    "WordNet lemmas with a SemCor-tagged sense (see iclit/tasks/data/README.md)",
    kind="generation",
    source=f"FreeDict eng-ces (Debian {res.FREEDICT_PACKAGE}), WordNet filter",
)
register_task(
    "addition",
    _addition,
    "sum of two two-digit numbers ('37 + 48' -> '85'), exact match; 400 distinct pairs",
    kind="generation",
    source=f"generated (seed {generated.SEED})",
)
register_task(
    "reverse-words",
    _reverse_words,
    "a list of 3-5 common nouns in reverse order ('cat dog sun' -> 'sun dog cat'), exact match; 400 lists",
    kind="generation",
    source=f"generated (seed {generated.SEED + 1})",
)


@dataclass(frozen=True)
class TaskInfo:
    """One row of :func:`task_table`: ``examples`` is ``None`` and ``missing`` says what to
    install (``apt-get install …``) or what failed when the task cannot be built."""

    name: str
    kind: str
    examples: int | None
    description: str
    source: str
    missing: str | None = None


def task_table() -> list[TaskInfo]:
    """Every registered task, also those whose resource is not installed (``iclit tasks``)."""
    rows = []
    for name, reg in _TASKS.items():
        try:
            task = _builtin(name)
        except res.MissingResourceError as e:
            rows.append(TaskInfo(name, reg.kind or "?", None, reg.description, reg.source, e.install))
            continue
        except TaskDataError as e:
            rows.append(TaskInfo(name, reg.kind or "?", None, reg.description, reg.source, str(e)))
            continue
        rows.append(TaskInfo(name, task.kind, len(task.examples), reg.description, reg.source or task.source))
    return rows


def list_tasks() -> list[tuple[str, str, int | None, str]]:
    """``(name, kind, number of examples, description)`` for each registered task; the number
    is ``None`` for a task whose resource is missing (:func:`task_table` says which)."""
    return [(r.name, r.kind, r.examples, r.description) for r in task_table()]


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


def get_task(
    name_or_path: str | Path, *, template: Template | Mapping[str, Any] | None = None, **loader_kwargs: Any
) -> Task:
    """A registered task by name, or a task file (``.jsonl``/``.csv``/``.parquet``, …).

    ``loader_kwargs`` go to :func:`~iclit.tasks.loaders.load_task` and apply to files only.
    ``template``: the task's template, a :class:`Template` or a mapping of its fields laid
    over the task's own (a file's own is :data:`~iclit.tasks.loaders.DEFAULT_TEMPLATE`).
    """
    key = str(name_or_path)
    if key in _TASKS:
        if loader_kwargs:
            raise TaskDataError(f"task {key!r} is built in; loader options {sorted(loader_kwargs)} apply only to files")
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


def resolve_task(
    task: str | Path | Task,
    template: str | None = None,
    instruction: bool = True,
    *,
    options: Mapping[str, Any] | None = None,
) -> Task:
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
