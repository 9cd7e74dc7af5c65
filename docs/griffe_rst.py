"""A griffe extension for the docs site: the package's docstrings use a few reStructuredText
habits (``:func:`name``` roles, ``::`` before a literal block, double backquotes) that
Markdown would show raw. Each becomes inline code; the docstrings themselves stay as they are."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|mod|data|meth|attr|exc|obj|py:\w+):`(~?)([^`]+)`")
_DOUBLE = re.compile(r"``([^`]+)``")
_LITERAL = re.compile(r"::$", re.M)


def _role(m: re.Match) -> str:
    name = m.group(2)
    return f"`{name.rsplit('.', 1)[-1] if m.group(1) else name}`"


def markdown_docstring(text: str) -> str:
    text = _ROLE.sub(_role, text)
    text = _DOUBLE.sub(r"`\1`", text)
    return _LITERAL.sub(":", text)


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
