"""Prompt formats: how a task's prompts meet a model's chat template.

``raw`` (the default for every model): the task template's text as it is, for base and instruct
models alike, so that a ``model`` factor compares the same text on every model (the paper's
format). ``chat``: every whole prompt — the anchor's query, the ICL prompt (instruction,
demonstrations and query, as one user message) and each IT training prompt — is put in one
user message of the tokenizer's chat template, followed by the assistant turn's opening; the
answer (the label read out, the IT training target) is the start of the assistant's reply,
without the leading space of the raw format. The three arms thus read the query at the same
position (the last token of the assistant turn's opening) under the same convention.

The frame is found by rendering one user message whose content is a marker and cutting at it
(:func:`chat_frame`): whatever the template adds (a default system prompt, BOS text) is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from iclit.tasks.base import FramedTemplate, Template

__all__ = ["PROMPT_FORMATS", "PromptFormat", "chat_frame", "chat_template_of", "framed_for"]

PromptFormat = Literal["raw", "chat"]
PROMPT_FORMATS: tuple[str, ...] = ("raw", "chat")

_MARKER = "\u2063ICLIT-USER-CONTENT\u2063"


def chat_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(head, tail) of one user message in the tokenizer's chat template, with the generation
    prompt: ``head + content + tail`` is what ``apply_chat_template`` renders for that message.

    Raises
    ------
    ValueError
        The tokenizer has no chat template, or its rendering does not hold the content once
        and verbatim (a template that rewrites the message cannot be framed).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompt_format 'chat' needs a tokenizer with a chat template; this model's has none "
            "(use prompt_format 'raw')"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str) or text.count(_MARKER) != 1:
        raise ValueError("the chat template does not render a user message verbatim once; use prompt_format 'raw'")
    head, _, tail = text.partition(_MARKER)
    return head, tail


def chat_template_of(template: Template, tokenizer: PreTrainedTokenizerBase) -> FramedTemplate:
    """``template`` framed by the tokenizer's chat template (:func:`chat_frame`)."""
    head, tail = chat_frame(tokenizer)
    return template.framed(head, tail)


@overload
def framed_for(prompt_format: str, template: Template, tokenizer: PreTrainedTokenizerBase) -> Template: ...
@overload
def framed_for(prompt_format: str, template: None, tokenizer: PreTrainedTokenizerBase) -> None: ...
@overload
def framed_for(
    prompt_format: str, template: Template | None, tokenizer: PreTrainedTokenizerBase
) -> Template | None: ...
def framed_for(prompt_format: str, template: Template | None, tokenizer: PreTrainedTokenizerBase) -> Template | None:
    """The template a run uses under ``prompt_format``: ``template`` itself for ``raw`` (or
    None), the chat-framed one for ``chat``."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r} (known: {', '.join(PROMPT_FORMATS)})")
    if template is None or prompt_format == "raw":
        return template
    return chat_template_of(template, tokenizer)
