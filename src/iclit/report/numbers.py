"""How the console, Markdown and HTML outputs write numbers: three decimals or significant
digits, p-values as "< 0.001" below that, and "–" where there is no number (NaN is null in
the exports' JSON; an interval over fewer than two varying blocks has none)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["num", "pvalue", "interval"]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def num(v: Any, fmt: str = "{:.3f}") -> str:
    """``fmt.format(v)``, or "–" where there is no number.

    >>> num(0.12345), num(None), num(float("nan"), "{:+.2f}")
    ('0.123', '–', '–')
    """
    return "–" if _missing(v) else fmt.format(v)


def pvalue(p: Any) -> str:
    """A p-value: three significant digits, "< 0.001" below that, "–" where there is none.

    >>> pvalue(0.0004), pvalue(0.04567), pvalue(None)
    ('< 0.001', '0.0457', '–')
    """
    return "–" if _missing(p) else ("< 0.001" if p < 0.001 else f"{p:.3g}")


def interval(mean: Any, lo: Any, hi: Any, fmt: str = "{:.3f}") -> str:
    """``mean [lo, hi]`` with :func:`num`'s format.

    >>> interval(0.5, 0.4, None)
    '0.500 [0.400, –]'
    """
    return f"{num(mean, fmt)} [{num(lo, fmt)}, {num(hi, fmt)}]"
