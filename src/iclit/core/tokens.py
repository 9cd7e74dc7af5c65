"""Token ids the engine and the tuning agree on: an answer's ids as they follow its prompt
(the boundary never merged across) and each verbalised label's first token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["answer_token_ids", "label_token_ids"]


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as they follow ``prompt``.

    Tokenises the answer on its own (no special tokens), so the prompt's tokens are exactly
    those the query prompt has at capture time: the boundary is never merged across.
    """
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def label_token_ids(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]) -> torch.Tensor:
    """First token id of each verbalised label (answers include their leading separator).

    Raises ValueError when two labels share a first token: they could not be told apart
    from the next-token distribution.
    """
    firsts = []
    for a in answers:
        ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label {a!r} tokenises to nothing")
        firsts.append(ids[0])
    if len(set(firsts)) != len(firsts):
        raise ValueError(
            f"labels {list(answers)} share a first token ({firsts}); choose label words that start differently"
        )
    return torch.tensor(firsts, dtype=torch.long)
