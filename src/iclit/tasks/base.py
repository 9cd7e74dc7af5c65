"""The task data model: examples, templates and tasks.

A :class:`Template` turns examples into the three kinds of text the experiment needs:

* the **query prompt** (anchor and IT arms): ``[instruction] + input + output prefix``;
* the **ICL prompt**: ``[instruction] + demo_1 + ... + demo_k + query`` where each
  demonstration is a query prompt (without the instruction) followed by its answer;
* the **IT training pairs**: ``(query prompt, " " + answer)`` for each demonstration; the
  tuning loss is taken on the answer tokens only.

All three share one rendering, so the ICL and IT arms see the demonstrations in the same
format. A :class:`FramedTemplate` (``Template.framed(head, tail)``) puts every prompt — query,
ICL and IT training prompt alike — between the same ``head`` and ``tail`` (an instruct
model's chat template around one user message, :func:`iclit.tasks.chat.chat_template_of`);
the demonstrations inside an ICL prompt stay plain text within that one message. The hidden
state compared is the one of the last token of the query prompt (the position that predicts the answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TaskKind = Literal["classification", "generation"]
Metric = Literal["chrf", "exact"]
METRICS: tuple[str, ...] = ("chrf", "exact")


@dataclass(frozen=True)
class Example:
    """One (input, output) pair. ``output`` is the verbalised label or the target text."""

    id: str
    input: str
    output: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def with_output(self, output: str) -> Example:
        """A copy with another output (used to give demonstrations wrong labels)."""
        return dataclasses.replace(self, output=output)


@dataclass(frozen=True)
class Template:
    """How examples become text.

    Rendering of one example (``{…}`` are fields)::

        {instruction}{instruction_sep}{input_prefix}{input}{io_sep}{output_prefix}{answer_sep}{output}

    Demonstrations are joined with ``demo_sep``. ``answer_sep`` (a space by default) starts
    the answer, so the prompt ends on the output prefix and the answer's first token carries
    its own leading space, as a tokenizer expects.
    """

    name: str = "default"
    instruction: str | None = None
    input_prefix: str = "Input: "
    output_prefix: str = "Output:"
    io_sep: str = "\n"
    answer_sep: str = " "
    demo_sep: str = "\n\n"
    instruction_sep: str = "\n\n"

    @property
    def opening(self) -> str:
        """Text before every whole prompt ('' here; a :class:`FramedTemplate`'s ``head``)."""
        return ""

    @property
    def closing(self) -> str:
        """Text after every whole prompt ('' here; a :class:`FramedTemplate`'s ``tail``)."""
        return ""

    def _head(self, with_instruction: bool) -> str:
        if with_instruction and self.instruction:
            return self.instruction + self.instruction_sep
        return ""

    def _block(self, text: str, with_instruction: bool = False) -> str:
        return f"{self._head(with_instruction)}{self.input_prefix}{text}{self.io_sep}{self.output_prefix}"

    def query(self, text: str, with_instruction: bool = True) -> str:
        """The query prompt for one input: ends on the output prefix (then the closing, if framed)."""
        return self.opening + self._block(text, with_instruction) + self.closing

    def query_end(self, text: str) -> str:
        """The text every prompt of this input ends with: the query without instruction (and
        the closing, if framed)."""
        return self._block(text) + self.closing

    def answer(self, output: str) -> str:
        """The continuation that the model should produce after a query prompt."""
        return f"{self.answer_sep}{output}"

    def demonstration(self, example: Example) -> str:
        """One demonstration as it appears inside an ICL prompt (no instruction)."""
        return f"{self._block(example.input)}{self.answer_sep}{example.output}"

    def icl_prefix(self, demonstrations: Sequence[Example], demo_template: Template | None = None) -> str:
        """Everything of the ICL prompt before the query: instruction and demonstrations.

        ``demo_template`` formats the demonstrations when they come from another task
        (e.g. translation demonstrations before a sentiment query); default: this template.
        """
        if not demonstrations:
            return self.opening + self._head(True)
        fmt = demo_template or self
        body = self.demo_sep.join(fmt.demonstration(d) for d in demonstrations)
        return self.opening + self._head(True) + body + self.demo_sep

    def icl_prompt(
        self, demonstrations: Sequence[Example], query: Example, demo_template: Template | None = None
    ) -> str:
        """The ICL prompt: the demonstrations in order, then the query prompt."""
        return self.icl_prefix(demonstrations, demo_template) + self.query_end(query.input)

    def training_pair(self, example: Example) -> tuple[str, str]:
        """(prompt, answer) for instruction tuning on one demonstration."""
        return self.query(example.input), self.answer(example.output)

    def replace(self, **changes: Any) -> Template:
        return dataclasses.replace(self, **changes)

    def framed(self, head: str, tail: str, reply_sep: str = "") -> FramedTemplate:
        """This template with every whole prompt put between ``head`` and ``tail``; the answer
        to a whole prompt then starts the model's turn with ``reply_sep`` ('' by default)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Template)}
        return FramedTemplate(**fields, head=head, tail=tail, reply_sep=reply_sep)


@dataclass(frozen=True)
class FramedTemplate(Template):
    """A :class:`Template` whose whole prompts (query, ICL, IT training prompt) are put between
    ``head`` and ``tail``: e.g. a chat template's opening up to one user message's content, and
    the message's end plus the assistant turn's opening. Demonstrations inside an ICL prompt
    are not framed and keep ``answer_sep``; the answer to a whole prompt (the label read out,
    the IT training target) is ``reply_sep + output``. Built per tokenizer at run time; a plan
    holds the plain template."""

    head: str = ""
    tail: str = ""
    reply_sep: str = ""

    def answer(self, output: str) -> str:
        return f"{self.reply_sep}{output}"

    @property
    def opening(self) -> str:
        return self.head

    @property
    def closing(self) -> str:
        return self.tail


@dataclass(frozen=True)
class Task:
    """A named set of examples with a template.

    ``labels`` is the verbaliser of a classification task (the label words the model
    scores); it is ``None`` for generation tasks.

    ``metric`` scores a generation task's answers: ``"chrf"`` (sentence chrF, 0..100, the
    default) or ``"exact"`` (1.0 when the answer equals the gold output once leading,
    trailing and repeated whitespace is removed, else 0.0; case and punctuation count). A
    classification task is scored by label match whatever ``metric`` says.
    ``max_new_tokens``: the most tokens an answer of this task needs (``None``: no cap of
    its own); the engine generates ``min(max_new_tokens, spec's max_new_tokens)``.
    """

    name: str
    kind: TaskKind
    examples: tuple[Example, ...]
    template: Template
    labels: tuple[str, ...] | None = None
    description: str = ""
    source: str = "builtin"
    metric: Metric = "chrf"
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "classification" and not self.labels:
            raise ValueError(f"task {self.name!r}: a classification task needs labels")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r} (use one of {list(METRICS)})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be at least 1, not {self.max_new_tokens}")

    @property
    def label_words(self) -> tuple[str, ...]:
        """The verbaliser of a classification task (ValueError for a generation task)."""
        if self.labels is None:
            raise ValueError(f"task {self.name!r} is a generation task: it has no label words")
        return self.labels

    @property
    def score_name(self) -> str:
        """What a trial's score is: ``correct`` (label match), ``exact_match`` or ``chrf``."""
        if self.kind == "classification":
            return "correct"
        return "exact_match" if self.metric == "exact" else "chrf"

    def __len__(self) -> int:
        return len(self.examples)

    def by_id(self, example_id: str) -> Example:
        for e in self.examples:
            if e.id == example_id:
                return e
        raise KeyError(example_id)

    def with_template(self, template: Template) -> Task:
        return dataclasses.replace(self, template=template)
