"""The IT recipe and a tuning run's result: plain data, no torch (the spec and ``iclit --help``
import this without loading torch or transformers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TuningRecipe:
    """How the IT arm tunes the base model on the k demonstrations.

    method: ``"lora"`` (a fresh adapter on ``targets``, the paper's choice) or ``"full"``
    (all weights of a fresh copy). lr: ``None`` picks 1e-3 for LoRA and 1e-5 for full
    fine-tuning. epochs: passes over the demonstrations; batch_size 0 puts all of them in one
    batch, so one epoch is one optimiser step. Gradients are clipped to ``max_grad_norm``.
    The defaults (LoRA r=8, alpha=16 on q/v, lr 1e-3, 12 full-batch epochs) fit k = 4
    sentiment demonstrations on Gemma-3-270M to a final answer loss of about 1e-3 or less on
    every resample (higher learning rates were unstable, fewer epochs left some resamples
    above 0.02); the per-resample final loss is reported with every run.

    capture_steps: optimiser steps (1-based) after which the IT arm also reads the tuned
    model's states and answers, so one training run gives the whole dose curve (ICL–IT
    similarity from barely tuned to the last step). Empty: only the end of training.
    """

    method: Literal["lora", "full"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float | None = None
    epochs: int = 12
    batch_size: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    capture_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "capture_steps", tuple(sorted({int(x) for x in self.capture_steps})))
        if any(x < 1 for x in self.capture_steps):
            raise ValueError(f"tuning capture_steps must be >= 1, not {list(self.capture_steps)}")
        if self.batch_size == 0 and self.capture_steps and self.capture_steps[-1] > self.epochs:
            raise ValueError(
                f"tuning capture_steps {list(self.capture_steps)} go past the last step: {self.epochs} "
                f"full-batch epochs are {self.epochs} optimiser steps"
            )
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
        if self.capture_steps:
            d["capture_steps"] = list(self.capture_steps)
        else:  # absent when unused, so trial keys of plain recipes stay as they were
            del d["capture_steps"]
        return d


@dataclass
class TuningResult:
    """losses: the training loss at each optimiser step; final_loss: the answer loss of the
    tuned model on all demonstrations after the last step."""

    losses: list[float] = field(default_factory=list)
    final_loss: float = float("nan")
    seconds: float = 0.0
