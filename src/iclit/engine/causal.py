"""The causal analyses of a spec (``analyses: [patch, steer]``), run in the engine with the model.

A cosine says two states point the same way, not that they do the same thing. These tests
put states (or their differences) into other runs at the query's last prompt token, at a
state index ℓ (capture's indexing: 0 = block 0's input, L = the final norm's output), and
read what the model then says (:func:`iclit.engine.interventions.intervene`, fast path).

**Patching**, per (query, set) trial and ℓ of ``patch_layers``:

* ``icl_into_anchor``: the base model's anchor run (the query alone) with h_ℓ replaced by the
  same query's ICL state — how much of ICL's behaviour the ICL state at ℓ carries (at L it is
  ICL's distribution exactly);
* ``it_into_anchor``: the same with the query's IT state (from its set's tuned model) — how
  much of ICL's behaviour the IT state carries: the paper's question;
* ``icl_into_it``: the reverse, the ICL state into the tuned model's query run (run inside
  the ``it`` arm, while the set's adapter exists: :attr:`ArmContext.on_tuned`);
* ``it_into_icl``: the IT state into the base model's ICL run (demonstrations + query).

**Steering** with update vectors, per trial, ℓ of ``steer_layers`` and scale α of
``steer_scales``: for query i of set A, ``v_arm(i) = mean over the other queries j of A of
(h_arm(j) − h_anchor(j))`` at ℓ (arm ``icl``: a task vector in the sense of Hendel et al.;
``it``: the mean IT update), leave-one-out so that the query's own runs never enter its
vector. Sign convention: the vector is h_arm − h_anchor, and it is *added*, h_ℓ ← h_ℓ + α v,
to query i's anchor run on the base model; α > 0 moves the anchor's state towards the arm's.
The null: ``steer_null_draws`` directions drawn uniformly on the sphere per (query, ℓ),
scaled to ‖v_icl‖ (``random_icl``) and to ‖v_it‖ (``random_it``), added with the same α. The
ceiling is the query's own ICL run.

What a run reads (:class:`Reader`): a classification task's label log-probabilities,
normalised over the task's labels (the distribution the arms' ``label_probs`` are); a
generation task has no such distribution, so it reads the log-probability (under the full
vocabulary) of the first token of the gold answer, as it follows the prompt.

Every trial stores one record under ``causal`` in its outputs (floats rounded to 6 decimals;
a "value" is a list: the label log-probabilities, or ``[log p(gold's first token)]``)::

    measure: labels | gold_first_token;   labels: the task's labels (classification)
    anchor, icl, it: the values of the unpatched runs (anchor and ICL on the base model, the
                     query on the tuned model), read in the same passes
    patch: {layers: [ℓ…], icl_into_anchor: [value per ℓ], it_into_anchor, icl_into_it, it_into_icl}
    steer: {layers: [ℓ…], scales: [α…], norm_icl, norm_it, cos_icl_it: [per ℓ],
            icl, it: [ℓ][α] → value, random_icl, random_it: [ℓ][α][draw] → value}
    seconds: the chunk's time in these analyses per trial (the cost of the interventions)

Every number of the analysis (KL, accuracy, fractions, CIs, tests) is computed from these by
:mod:`iclit.analysis.causal`, without the model.

Cost: each intervention is one last-token forward on a cached prefix (:data:`ROWS` of them
per forward pass); per trial 4·|patch_layers| + |steer_layers|·|scales|·(2 + 2·draws) + 3,
plus one prefix per prompt and call (the anchor prompt twice, the ICL prompt's query part
once on its set's shared demonstrations). Generation tasks compute one full-vocabulary head
row per run (for the log-normaliser), which on a 262k vocabulary costs about as much as the
decoder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from iclit.core.tokens import answer_token_ids
from iclit.engine.interventions import Intervention, intervene, random_directions
from iclit.tasks import Resample, Task, Template

__all__ = [
    "ANALYSES",
    "PATCH_KINDS",
    "STEER_VECTORS",
    "PATCH_STRIDE",
    "STEER_STRIDE",
    "ROWS",
    "CausalSettings",
    "Reader",
    "ReversePatch",
    "steering_vectors",
    "causal_records",
]

ANALYSES = ("patch", "steer")
PATCH_KINDS = ("icl_into_anchor", "it_into_anchor", "icl_into_it", "it_into_icl")
STEER_VECTORS = ("icl", "it", "random_icl", "random_it")
PATCH_STRIDE = 2
"""``patch_layers: null``: every 2nd state index, L, L−2, … down to 1."""
STEER_STRIDE = 3
"""``steer_layers: null``: every 3rd state index, L, L−3, … down to 1."""
ROWS = 64
"""Interventions per forward pass (one token each, on a prompt's cached prefix)."""
DIGITS = 6


@dataclass(frozen=True)
class CausalSettings:
    """The spec's causal keys (:meth:`ExperimentSpec.causal_settings`): which analyses, at which
    state indices (None: the default stride; ``"all"``: 1..L; else the listed ones), the
    steering scales and the random directions per query, layer and scale."""

    analyses: tuple[str, ...] = ()
    patch_layers: tuple[int, ...] | str | None = None
    steer_layers: tuple[int, ...] | str | None = None
    steer_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    steer_null_draws: int = 1

    def __post_init__(self) -> None:
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise ValueError(f"unknown analyses {unknown} (analyses: {', '.join(ANALYSES)})")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CausalSettings | None:
        """From :meth:`ExperimentSpec.causal_settings` (lists as tuples); None for None or no analyses."""
        if not data or not data.get("analyses"):
            return None
        known: dict[str, Any] = {
            k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data.items() if k in cls.__dataclass_fields__
        }
        return cls(**known)

    @property
    def patch(self) -> bool:
        return "patch" in self.analyses

    @property
    def steer(self) -> bool:
        return "steer" in self.analyses

    def layers(self, which: str, last: int) -> list[int]:
        """The state indices of ``which`` (patch or steer) for a model with L = ``last``."""
        given = self.patch_layers if which == "patch" else self.steer_layers
        if given is None:
            return sorted(range(last, 0, -(PATCH_STRIDE if which == "patch" else STEER_STRIDE)))
        if given == "all":
            return list(range(1, last + 1))
        return sorted(int(x) for x in given)

    def check(self, last: int) -> None:
        """Every listed state index exists in a model with L = ``last``; ValueError naming the key."""
        for which, key in (("patch", "patch_layers"), ("steer", "steer_layers")):
            if which in self.analyses:
                bad = [x for x in self.layers(which, last) if not 0 <= x <= last]
                if bad:
                    raise ValueError(
                        f"{key}: state index {bad[0]} does not exist: this model's states are 0..{last} "
                        f"(L = {last}: 0 is block 0's input, {last} the final norm's output)"
                    )


class Reader:
    """What is read of a run: the label log-probabilities (classification, normalised over the
    labels) or the log-probability of the gold answer's first token (generation).

    ``label_ids`` and ``logprobs`` are what :func:`intervene` takes; :meth:`values` turns a
    run's output row into the stored value of draw i."""

    def __init__(self, tokenizer: Any, task: Task, draws: Sequence[Resample], label_ids: torch.Tensor | None) -> None:
        self.task = task
        if task.kind == "classification":
            self.measure = "labels"
            self.label_ids, self.logprobs, self.column = label_ids, False, None
            return
        self.measure = "gold_first_token"
        firsts = []
        for r in draws:
            prompt = task.template.query(r.query.input)
            ids = answer_token_ids(tokenizer, prompt, task.template.answer(r.query.output))
            if not ids:
                raise ValueError(f"the gold answer of query {r.query.id!r} tokenises to nothing: nothing to read")
            firsts.append(int(ids[0]))
        union = sorted(set(firsts))
        self.label_ids, self.logprobs = torch.tensor(union, dtype=torch.long), True
        self.column = [union.index(t) for t in firsts]
        self.tokens = firsts

    def values(self, out: torch.Tensor, i: int) -> torch.Tensor:
        """[..., n] output rows of draw i → [..., v] values (v = n_labels, or 1)."""
        if self.column is None:
            return torch.log_softmax(out.double(), dim=-1)
        return out[..., self.column[i] : self.column[i] + 1].double()

    def header(self, i: int) -> dict[str, Any]:
        if self.column is None:
            labels = self.task.labels
            assert labels is not None  # no column: a classification task, which has labels
            return {"measure": self.measure, "labels": list(labels)}
        return {"measure": self.measure, "token": self.tokens[i]}


def _rounded(x: torch.Tensor) -> Any:
    return [_rounded(t) for t in x] if x.dim() > 1 else [round(float(v), DIGITS) for v in x]


class ReversePatch:
    """The ``it`` arm's hook (:attr:`iclit.engine.readout.ArmContext.on_tuned`): while a set's
    tuned model exists, its query runs unpatched (the IT reference) and with the query's ICL
    state at each patch layer (``icl_into_it``). ``icl_states()``: the ICL arm's ``[n, L+1, d]``
    states (that arm runs first)."""

    def __init__(
        self,
        settings: CausalSettings,
        reader: Reader,
        tokenizer: Any,
        draws: Sequence[Resample],
        prompts: Sequence[str],
        icl_states: Callable[[], torch.Tensor],
        *,
        fast: bool = True,
    ) -> None:
        self.settings, self.reader, self.tokenizer, self.draws = settings, reader, tokenizer, draws
        self.prompts, self.icl_states, self.fast = list(prompts), icl_states, fast
        self.results: dict[int, torch.Tensor] = {}
        self.seconds = 0.0

    def __call__(self, model: nn.Module, rows: Sequence[int], route: Callable[[list[int]], None] | None) -> None:
        start = time.perf_counter()
        rows = list(rows)
        icl = self.icl_states()
        last = icl.shape[1] - 1
        layers = self.settings.layers("patch", last) if self.settings.patch else []
        runs = [[None] + [Intervention(li, icl[i, li], "replace") for li in layers] for i in rows]
        out = intervene(
            model,
            self.tokenizer,
            [self.prompts[i] for i in rows],
            runs,
            label_ids=self.reader.label_ids,
            batch_size=ROWS,
            before_batch=route,
            reference=not self.fast,
            logprobs=self.reader.logprobs,
            prefixes=[str(self.draws[i].set_id) for i in rows],
        )  # one adapter per set
        for pos, i in enumerate(rows):
            self.results[i] = out[pos]
        self.seconds += time.perf_counter() - start


def _sets(draws: Sequence[Resample]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(draws):
        groups.setdefault(r.set_id, []).append(i)
    return list(groups.values())


def steering_vectors(anchor: torch.Tensor, arm: torch.Tensor, draws: Sequence[Resample]) -> torch.Tensor:
    """Leave-one-out mean updates: row i → the mean of ``arm − anchor`` over the other rows of
    its demonstration set, ``[n, L+1, d]`` float64. ValueError for a set with one query."""
    update = arm.double() - anchor.double()
    out = torch.empty_like(update)
    for rows in _sets(draws):
        if len(rows) < 2:
            raise ValueError(
                f"steer needs two or more queries per demonstration set; set {draws[rows[0]].set_id} "
                "has one here (queries_per_set >= 2)"
            )
        u = update[rows]
        out[rows] = (u.sum(dim=0, keepdim=True) - u) / (len(rows) - 1)
    return out


def _trial_generator(seed: int, r: Resample) -> torch.Generator:
    """The random directions of one trial: fixed by (seed, resample), whatever the chunking."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(r.index) * 7_919 + 104_729) % (2**63 - 1))


def causal_records(
    lm: Any,
    task: Task,
    draws: Sequence[Resample],
    states: Mapping[str, torch.Tensor],
    reverse: ReversePatch,
    settings: CausalSettings,
    *,
    seed: int = 0,
    fast: bool = True,
    demo_template: Template | None = None,
) -> list[dict[str, Any]]:
    """One ``causal`` record per draw (module docstring), from the arms' states (``anchor``,
    ``icl``, ``it``: ``[n, L+1, d]``) and the ``it`` arm's :class:`ReversePatch` results."""
    start = time.perf_counter()
    model, tok, reader = lm.model, lm.tokenizer, reverse.reader
    anchor, icl, it = (states[a].float() for a in ("anchor", "icl", "it"))
    n, last = anchor.shape[0], anchor.shape[1] - 1
    settings.check(last)
    patch = settings.layers("patch", last) if settings.patch else []
    steer = settings.layers("steer", last) if settings.steer else []
    scales, n_draws = [float(s) for s in settings.steer_scales], int(settings.steer_null_draws)

    # the base model's anchor runs: unpatched, the two patches, the steered runs
    steered: dict[str, torch.Tensor] = {}
    if steer:
        steered["icl"] = steering_vectors(anchor, icl, draws)[:, steer].float()  # [n, S, d]
        steered["it"] = steering_vectors(anchor, it, draws)[:, steer].float()
    anchor_runs, randoms = [], []
    for i, r in enumerate(draws):
        runs: list[Intervention | None] = [None]
        runs += [Intervention(li, icl[i, li], "replace") for li in patch]
        runs += [Intervention(li, it[i, li], "replace") for li in patch]
        if steer:
            unit = random_directions(torch.ones(len(steer) * n_draws), anchor.shape[-1], _trial_generator(seed, r))
            unit = unit.view(len(steer), n_draws, -1)
            randoms.append(unit)
            for s, li in enumerate(steer):
                v_icl, v_it = steered["icl"][i, s], steered["it"][i, s]
                nulls = [unit[s, k] * v_icl.norm() for k in range(n_draws)] + [
                    unit[s, k] * v_it.norm() for k in range(n_draws)
                ]
                for a in scales:
                    runs += [Intervention(li, v, "add", scale=a) for v in (v_icl, v_it, *nulls)]
        anchor_runs.append(runs)
    prompts = [task.template.query(r.query.input) for r in draws]
    at_anchor = intervene(
        model,
        tok,
        prompts,
        anchor_runs,
        label_ids=reader.label_ids,
        batch_size=ROWS,
        reference=not fast,
        logprobs=reader.logprobs,
        prefixes=["query"] * n,
    )
    # the base model's ICL runs: unpatched, and with the IT state
    icl_runs = [[None] + [Intervention(li, it[i, li], "replace") for li in patch] for i in range(n)]
    icl_prompts = [task.template.icl_prompt(r.demonstrations, r.query, demo_template) for r in draws]
    icl_prefixes = [task.template.icl_prefix(r.demonstrations, demo_template) for r in draws]
    at_icl = intervene(
        model,
        tok,
        icl_prompts,
        icl_runs,
        label_ids=reader.label_ids,
        batch_size=ROWS,
        reference=not fast,
        logprobs=reader.logprobs,
        prefixes=icl_prefixes,
    )

    records = []
    P, S, A, D = len(patch), len(steer), len(scales), n_draws
    for i in range(n):
        if i not in reverse.results:
            raise RuntimeError(f"the it arm did not run the reverse patch of draw {i}")
        a_vals = reader.values(at_anchor[i, : 1 + 2 * P + S * A * (2 + 2 * D)], i)
        i_vals = reader.values(at_icl[i, : 1 + P], i)
        t_vals = reader.values(reverse.results[i][: 1 + P], i)
        rec: dict[str, Any] = {
            **reader.header(i),
            "anchor": _rounded(a_vals[0]),
            "icl": _rounded(i_vals[0]),
            "it": _rounded(t_vals[0]),
        }
        if patch:
            rec["patch"] = {
                "layers": patch,
                "icl_into_anchor": _rounded(a_vals[1 : 1 + P]),
                "it_into_anchor": _rounded(a_vals[1 + P : 1 + 2 * P]),
                "icl_into_it": _rounded(t_vals[1 : 1 + P]),
                "it_into_icl": _rounded(i_vals[1 : 1 + P]),
            }
        if steer:
            grid = a_vals[1 + 2 * P :].view(S, A, 2 + 2 * D, -1)
            v_icl, v_it = steered["icl"][i].double(), steered["it"][i].double()
            cos = torch.nn.functional.cosine_similarity(v_icl, v_it, dim=-1, eps=1e-12)
            rec["steer"] = {
                "layers": steer,
                "scales": scales,
                "norm_icl": _rounded(v_icl.norm(dim=-1)),
                "norm_it": _rounded(v_it.norm(dim=-1)),
                "cos_icl_it": _rounded(cos),
                "icl": _rounded(grid[:, :, 0]),
                "it": _rounded(grid[:, :, 1]),
                "random_icl": _rounded(grid[:, :, 2 : 2 + D]),
                "random_it": _rounded(grid[:, :, 2 + D :]),
            }
        records.append(rec)
    per_trial = round((time.perf_counter() - start + reverse.seconds) / max(1, n), 4)
    for rec in records:
        rec["seconds"] = per_trial  # the analyses' time per trial, the reverse patch in the it arm included
    return records
