"""Instruction tuning on the demonstrations: LoRA (PEFT) or full fine-tuning.

The loss is the mean cross-entropy of the answer tokens only. It is computed from the
decoder's hidden states at the answer positions, through the rows of the LM head that those
positions need — the full-vocabulary logits of the prompt tokens are never built (Gemma-3 has
a 262k vocabulary).
"""

from __future__ import annotations

import copy
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iclit.capture import answer_token_ids
from iclit.models.arch import decoder_of, lm_head_logits


@dataclass(frozen=True)
class TuningRecipe:
    """How the IT arm tunes the base model on the k demonstrations.

    method: ``"lora"`` (a fresh adapter on ``targets``, the paper's choice) or ``"full"``
    (all weights of a fresh copy). lr: ``None`` picks 1e-3 for LoRA and 1e-5 for full
    fine-tuning. epochs: passes over the demonstrations; batch_size 0 puts all of them in one
    batch, so one epoch is one optimiser step. Gradients are clipped to ``max_grad_norm``.
    The defaults fit k = 4 sentiment demonstrations on Gemma-3-270M to a final answer loss
    near zero (see the README); the per-resample final loss is reported with every run.
    """

    method: Literal["lora", "full"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float | None = None
    epochs: int = 15
    batch_size: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"tuning method must be 'lora' or 'full', not {self.method!r}")
        for name in ("rank", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"tuning {name} must be >= 1, not {getattr(self, name)}")
        if self.batch_size < 0:
            raise ValueError(f"tuning batch_size must be >= 0, not {self.batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"tuning lr must be > 0, not {self.lr}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.method == "lora" else 1e-5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["lr"] = self.learning_rate
        return d


@dataclass
class TuningResult:
    """losses: the training loss at each optimiser step; final_loss: the answer loss of the
    tuned model on all demonstrations after the last step."""

    losses: list[float] = field(default_factory=list)
    final_loss: float = float("nan")
    seconds: float = 0.0


@dataclass
class AnswerBatch:
    """Prompt + answer token sequences, right-padded.

    input_ids, attention_mask: [b, s]; predict_at: [m] flat indices into b*s of the positions
    whose next token is an answer token; targets: [m] those answer tokens;
    example: [m] which sequence each target belongs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    predict_at: torch.Tensor
    targets: torch.Tensor
    example: torch.Tensor

    def to(self, device: torch.device) -> "AnswerBatch":
        return AnswerBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.predict_at, self.targets, self.example)))


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]) -> AnswerBatch:
    """Tokenise (prompt, answer) pairs: prompt tokens exactly as at capture time, then the
    answer's tokens."""
    seqs, starts = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = answer_token_ids(tokenizer, prompt, answer)
        if not a:
            raise ValueError(f"answer {answer!r} tokenises to nothing")
        seqs.append(p + a)
        starts.append(len(p))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    predict_at, targets, example = [], [], []
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        for t in range(start, len(seq)):
            predict_at.append(row * width + t - 1)
            targets.append(seq[t])
            example.append(row)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return AnswerBatch(ids, mask, as_long(predict_at), as_long(targets), as_long(example))


def answer_token_losses(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Cross-entropy of each answer token: [m]. Only the m needed LM-head rows are computed."""
    hidden = decoder_of(model)(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    rows = hidden.flatten(0, 1)[batch.predict_at]
    logits = lm_head_logits(model, rows).float()
    return nn.functional.cross_entropy(logits, batch.targets, reduction="none")


def answer_loss(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Mean answer-token cross-entropy (a scalar)."""
    return answer_token_losses(model, batch).mean()


def _subset(batch: AnswerBatch, rows: list[int]) -> AnswerBatch:
    keep = torch.isin(batch.example, torch.tensor(rows, device=batch.example.device))
    width = batch.input_ids.shape[1]
    remap = {r: j for j, r in enumerate(rows)}
    ex = batch.example[keep]
    new_ex = torch.tensor([remap[int(e)] for e in ex], dtype=torch.long, device=ex.device)
    pos = batch.predict_at[keep] % width
    return AnswerBatch(
        batch.input_ids[rows], batch.attention_mask[rows], new_ex * width + pos, batch.targets[keep], new_ex
    )


def fit(model: nn.Module, params: list[nn.Parameter], batch: AnswerBatch, recipe: TuningRecipe, seed: int) -> TuningResult:
    """Train ``params`` of ``model`` on ``batch`` with AdamW, constant learning rate."""
    start = time.perf_counter()
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    n = batch.input_ids.shape[0]
    size = recipe.batch_size or n
    gen = torch.Generator().manual_seed(seed)
    result = TuningResult()
    model.train()
    try:
        for _ in range(recipe.epochs):
            order = torch.randperm(n, generator=gen).tolist() if size < n else list(range(n))
            for i in range(0, n, size):
                mb = batch if size >= n else _subset(batch, order[i : i + size])
                loss = answer_loss(model, mb)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                result.losses.append(float(loss.detach()))
    finally:
        model.eval()
    with torch.no_grad():
        result.final_loss = float(answer_loss(model, batch))
    result.seconds = time.perf_counter() - start
    return result


def lora_config(recipe: TuningRecipe):
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=list(recipe.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def tuned(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    recipe: TuningRecipe,
    *,
    seed: int = 0,
) -> Iterator[tuple[nn.Module, TuningResult]]:
    """Tune on ``pairs`` and yield (tuned model, result); the base model is restored after.

    LoRA: a fresh PEFT adapter is injected into ``model`` and removed (unmerged) on exit, so
    the base weights are never changed. Full: a deep copy is tuned and dropped on exit.
    """
    device = next(model.parameters()).device
    batch = encode_pairs(tokenizer, pairs).to(device)
    torch.manual_seed(seed)
    if recipe.method == "lora":
        from peft import get_peft_model

        with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config(recipe))
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            result = fit(peft_model, params, batch, recipe, seed)
            yield peft_model, result
        finally:
            peft_model.unload()
            vars(model).pop("peft_config", None)
            model.requires_grad_(False)
    else:
        clone = copy.deepcopy(model)
        clone.requires_grad_(True)
        try:
            result = fit(clone, list(clone.parameters()), batch, recipe, seed)
            clone.requires_grad_(False)
            yield clone, result
        finally:
            del clone
