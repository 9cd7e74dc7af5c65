"""Tasks generated from a fixed seed, with one exact answer each.

* :func:`addition_examples`: two-digit addition, ``"37 + 48"`` → ``"85"``;
* :func:`reverse_words_examples`: a short list of common words in reverse order,
  ``"cat dog sun"`` → ``"sun dog cat"`` (a multi-step task: the model must find, then
  reorder, every word).

Both are deterministic: the same examples on every machine and Python version (they use
:class:`random.Random` with a fixed integer seed, whose sequence Python keeps stable).
"""

from __future__ import annotations

import random

from .base import Example

__all__ = ["SEED", "addition_examples", "reverse_words_examples", "WORDS"]

SEED = 20240601

WORDS = (
    "apple bird boat book bread car cat chair cloud coat cup desk dog door egg fish flower fork "
    "frog glass hat horse house key lamp leaf lion milk moon mouse nose pen pig rain ring road "
    "rock rose ship shoe sock star stone sun table tree wall watch window wolf"
).split()
"""50 common, concrete English nouns (a list written for iclit)."""


def addition_examples(n: int = 400, seed: int = SEED) -> list[Example]:
    """``n`` sums ``a + b`` of two-digit numbers (10..99 each), in drawn order.

    No two examples add the same two numbers (not even swapped: ``48 + 37`` is never a
    demonstration for the query ``37 + 48``); the order of the two is drawn too.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    chosen = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in rng.sample(pairs, n)]
    return [
        Example(id=f"add-{i:04d}", input=f"{a} + {b}", output=str(a + b), meta={"carry": (a % 10 + b % 10) >= 10})
        for i, (a, b) in enumerate(chosen, start=1)
    ]


def reverse_words_examples(n: int = 400, seed: int = SEED + 1, lengths: tuple[int, ...] = (3, 4, 5)) -> list[Example]:
    """``n`` lists of 3 to 5 different words from :data:`WORDS`, and the list reversed.

    No list is drawn twice, and no list is the reverse of another (whose answer would be a
    demonstration's input).
    """
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out: list[Example] = []
    while len(out) < n:
        words = tuple(rng.sample(WORDS, rng.choice(lengths)))
        if words in seen or words[::-1] in seen:
            continue
        seen.add(words)
        out.append(
            Example(
                id=f"rev-{len(out) + 1:04d}",
                input=" ".join(words),
                output=" ".join(reversed(words)),
                meta={"n_words": len(words)},
            )
        )
    return out
