"""The replication's summary: per claim of Duan et al. (2023), what iclit finds in the paper
suite's runs, and whether the design could have found otherwise.

:data:`CLAIMS` names, per claim, the run (a spec of ``configs/paper``, run into
``ROOT/<run>`` by ``scripts/run_paper.py``), the cell and the test that answers it;
:func:`claim_rows` computes every number from the stored states with the package's own
tests, and :func:`claims_markdown` writes the table of ``docs/replication.md``. Nothing here
computes a statistic of its own:

* ``anchors``: ICL–IT against anchor–ICL and anchor–IT in one cell
  (:func:`iclit.analysis.contrasts.within_cell_contrasts`: query blocks as units, Holm over
  the two comparisons, TOST at the spec's ``between`` margin);
* ``demo_swap`` / ``query_swap``: a pair's excess over that null in one cell
  (:attr:`RunData.tests`, :mod:`iclit.analysis.nulls`: exact sign flips over the query blocks,
  Holm over the cell's tests at its last layer, TOST at the declared margin), with the cell's
  positive control (IT seed 1 vs 2, else ICL vs reordered ICL) under the same null;
* ``factor``: one level of a factor against its reference level
  (:func:`iclit.analysis.contrasts.cell_contrasts`: paired over the query blocks the cells
  share, Holm over every level × quantity of that factor, TOST at ``between``).

"Can the design tell?" is answered from the same numbers: a null test can when its smallest
attainable p is below 0.05 and its positive control is above the same null in the same cell
(the test sees specificity where it must exist); a contrast can when it rejected, or when the
smallest difference it detects with 80% power (:func:`iclit.analysis.power.detectable_effect`,
from its own standard error) is inside the margin, so that "no difference" could have been
shown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from iclit.analysis.cells import last_layer_rows
from iclit.analysis.contrasts import ANCHOR_COMPARISONS, cell_contrasts, within_cell_contrasts
from iclit.analysis.nulls import PAIR_NAMES
from iclit.analysis.power import detectable_effect
from iclit.analysis.rundata import RunData, load_run
from iclit.analysis.stats import cluster_mean
from iclit.analysis.units import unit_values

__all__ = ["BEGIN", "CLAIMS", "CLAIM_COLUMNS", "END", "Claim", "claim_rows", "claims_markdown", "with_claims"]

Kind = Literal["anchors", "demo_swap", "query_swap", "factor"]


@dataclass(frozen=True)
class Claim:
    """One row of the summary.

    key: a short name; experiment: its section; claim: the paper's claim (or whose check it
    is); paper: the paper's number as reported; run: the run directory under the suite root;
    kind: which test answers it (module docstring); cell: factor values of the cell read
    (``anchors``, ``*_swap``); pair: the pair tested (``*_swap``); factor, level: the level
    compared with the factor's reference level (``factor``)."""

    key: str
    experiment: str
    claim: str
    paper: str
    run: str
    kind: Kind
    cell: Mapping[str, str] = field(default_factory=dict)
    pair: str = "icl_it"
    factor: str | None = None
    level: str | None = None


GEMMA, SMOL, RANDOM = "gemma-3-270m", "smollm2-135m-instruct", "gemma-3-270m@random"
CLAIMS: tuple[Claim, ...] = (
    Claim("main", "1. Main comparison", "ICL–IT high, both anchor pairs low", "ICL–IT ≈ 0.9 (LLaMA-2-7B)",
          "main", "anchors", {"model": GEMMA}),
    Claim("specific", "1. Main comparison", "ICL acts like IT on *these* demonstrations (demo-swap: iclit's test)",
          "implied by 'ICL is implicit IT'", "main", "demo_swap", {"model": GEMMA}),
    Claim("query", "1. Main comparison", "ICL–IT specific to the query (query-swap: iclit's test)", "—",
          "main", "query_swap", {"model": GEMMA}),
    Claim("smol_main", "1. Main comparison", "the same on the model whose ICL reads labels (SmolLM2)",
          "—", "main", "anchors", {"model": SMOL}),
    Claim("smol_specific", "1. Main comparison", "specific to these demonstrations, SmolLM2", "—",
          "main", "demo_swap", {"model": SMOL}),
    Claim("label_control", "2. Label control (iclit)", "IT tuned on flipped labels differs from IT on gold; does ICL?",
          "—", "label_control", "demo_swap", {"model": GEMMA}),
    Claim("smol_label_control", "2. Label control (iclit)", "flipped-label control, SmolLM2", "—",
          "label_control", "demo_swap", {"model": SMOL}),
    Claim("cross_task", "3. Demonstrations from another task", "other-task demonstrations: no convergence",
          "the three similarities alike", "cross_task", "factor", factor="demo_task", level="translation-en-cs"),
    Claim("similarity", "4. Demonstration–query similarity",
          "more similar demonstrations, more convergence (our reading)", "depends on similarity",
          "similarity", "factor", factor="similarity", level="most"),
    Claim("n_demos", "5. Number of demonstrations", "more demonstrations, more convergence", "rises with k",
          "n_demos", "factor", factor="k", level="8"),
    Claim("wrong_labels", "6. Wrong labels", "wrong labels weaken the convergence (our reading)",
          "depends on correct labels", "wrong_labels", "factor", factor="wrong_labels", level="1.0"),
    Claim("instruction", "7. Instruction", "the convergence holds without an instruction", "varies templates",
          "instruction", "factor", factor="instruction", level="False"),
    Claim("full_ft", "8. LoRA vs full fine-tuning (reviewers)",
          "does the finding depend on LoRA? (lr 1e-5 vs 1e-3: a dose too)", "—",
          "lora_vs_full", "factor", factor="recipe", level="full"),
    Claim("translation", "10. English–Czech translation", "the pattern on a second task", "second task",
          "translation", "anchors"),
    Claim("models", "11. Base vs instruction-tuned", "holds on a chat model (confounded here: family, size)",
          "LLaMA-2 vs -Chat", "models", "factor", factor="model", level=SMOL),
    Claim("random", "11. Control model (iclit)", "a random-weight network: any query-swap excess?", "—",
          "models", "query_swap", {"model": RANDOM}),
    Claim("size", "12. Model size, within Qwen2.5-Coder", "the convergence grows with size (7B vs 13B in the paper)",
          "7B vs 13B", "ladder", "factor", factor="model", level="qwen2.5-coder-1.5b-instruct"),
    Claim("antonyms", "14. Harder tasks (reviewers)", "specific to these demonstrations: WordNet antonyms", "—",
          "tasks_antonyms", "demo_swap"),
    Claim("translation_words", "14. Harder tasks (reviewers)",
          "specific to these demonstrations: FreeDict English→Czech words", "—", "tasks_translation_words",
          "demo_swap"),
    Claim("addition", "14. Harder tasks (reviewers)", "specific to these demonstrations: two-digit addition", "—",
          "tasks_addition", "demo_swap"),
    Claim("reverse_words", "14. Harder tasks (reviewers)", "specific to these demonstrations: reversing nouns", "—",
          "tasks_reverse_words", "demo_swap"),
)  # fmt: skip
"""The claims of the summary table, in its order."""

CLAIM_COLUMNS = (
    "key", "experiment", "claim", "paper", "run", "kind", "value", "value_low", "value_high", "diff", "ci_low",
    "ci_high", "p_holm", "family", "margin", "verdict", "control", "control_diff", "control_low", "control_high",
    "control_verdict", "fraction", "p_min", "detectable", "can_tell", "iclit", "verdict_text", "control_text",
    "can_tell_text",
)  # fmt: skip
"""One row per claim. value (low, high): the cell's ICL–IT cosine (``factor``: the level's)
with its 95% t interval over query blocks; diff (ci_low, ci_high): the tested quantity (an
excess over a null, ICL–IT − anchor–ICL, or level − reference); p_holm and family: the
adjusted p and the size of its Holm family; margin, verdict: the equivalence margin and the
package's verdict; control*: the positive control (``*_swap``: its excess over the same null
and verdict; ``anchors``: the IT seed ceiling's cosine); fraction: diff as a fraction of the
control's excess; p_min: the test's smallest attainable p; detectable: the smallest
difference detected with 80% power; can_tell: whether the design could have found otherwise;
``*_text``: the table's cells."""


def _cell_key(run: RunData, cell: Mapping[str, str]) -> str:
    labels = run.outputs.drop_duplicates("cell_key")
    hit = labels
    for name, value in cell.items():
        hit = hit[hit[name].astype(str) == str(value)]
    if len(hit) != 1:
        raise KeyError(f"{run.path}: {len(hit)} cells match {dict(cell)}")
    return str(hit["cell_key"].iloc[0])


def _cosine(run: RunData, key: str, pair: str = "icl_it") -> tuple[float, float, float]:
    """The cell's mean cosine of ``pair`` at its last layer, with the 95% t interval over blocks."""
    u = unit_values(run, [(pair, "cosine")])
    u = u[u["cell_key"] == key]
    res = cluster_mean(
        u["value"].to_numpy(dtype=float), [f"{s}/{b}" for s, b in zip(u["seed"], u["block"], strict=True)]
    )
    low, high = res.ci()
    return float(res.mean), float(low), float(high)


def _detectable(low: float, high: float, n_blocks: int, family: int) -> float:
    """The difference a t test with this 95% CI detects with 80% power at alpha / family."""
    from scipy import stats as sps

    if n_blocks < 2 or not np.isfinite(high - low):
        return float("nan")
    se = (high - low) / (2 * sps.t.ppf(0.975, n_blocks - 1))
    return float(detectable_effect(se * np.sqrt(n_blocks), n_blocks, family=family))


def _contrast_can_tell(verdict: str, detectable: float, margin: float) -> bool:
    """A contrast tells when it rejected, or when it could have shown equivalence (it detects
    differences smaller than its margin with 80% power)."""
    return verdict in ("above null", "below null") or bool(np.isfinite(detectable) and detectable < margin)


def _anchors(run: RunData, claim: Claim) -> dict[str, Any]:
    key = _cell_key(run, claim.cell)
    table = within_cell_contrasts(run, ANCHOR_COMPARISONS, cells=[key])
    first = table.iloc[0]  # ICL–IT − anchor–ICL
    value = _cosine(run, key)
    tests = last_layer_rows(run.tests)
    ceiling = tests[(tests["cell_key"] == key) & (tests["pair"] == "ceiling_it") & (tests["centring"] == "raw")]
    control = float(ceiling["observed"].iloc[0]) if len(ceiling) else float("nan")
    detectable = _detectable(first["ci_low"], first["ci_high"], int(first["n_blocks_a"]), len(table))
    others = {r.pair_b: r for r in table.itertuples()}
    return {
        "value": value[0], "value_low": value[1], "value_high": value[2],
        "diff": first["diff"], "ci_low": first["ci_low"], "ci_high": first["ci_high"], "p_holm": first["p_holm"],
        "family": len(table), "margin": first["margin"], "verdict": first["verdict"], "control": "it_it_seed",
        "control_diff": control, "detectable": detectable,
        "can_tell": _contrast_can_tell(first["verdict"], detectable, first["margin"]),
        "anchor_icl": others["anchor_icl"].mean_b, "anchor_it": others["anchor_it"].mean_b,
        "vs_anchor_it": others["anchor_it"].diff,
    }  # fmt: skip


def _null(run: RunData, claim: Claim, null: str) -> dict[str, Any]:
    key = _cell_key(run, claim.cell)
    tests = last_layer_rows(run.tests)
    cell = tests[(tests["cell_key"] == key) & (tests["centring"] == "raw") & (tests["null"] == null)]
    row = cell[cell["pair"] == claim.pair].iloc[0]
    controls = [p for p in ("ceiling_it", "ceiling_icl") if (cell["pair"] == p).any()]
    ctl = cell[cell["pair"] == controls[0]].iloc[0] if controls else None
    value = _cosine(run, key, claim.pair)
    family = int(((tests["cell_key"] == key) & (tests["role"] == "test")).sum())
    out = {
        "value": value[0], "value_low": value[1], "value_high": value[2],
        "diff": row["diff"], "ci_low": row["ci_low"], "ci_high": row["ci_high"], "p_holm": row["p_holm"],
        "family": family, "margin": row["margin"], "verdict": row["verdict"], "fraction": row["fraction"],
        "p_min": row["p_min"],
        "detectable": _detectable(row["ci_low"], row["ci_high"], int(row["n_blocks"]), family),
    }  # fmt: skip
    if ctl is not None:
        out |= {
            "control": str(ctl["pair"]), "control_diff": ctl["diff"], "control_low": ctl["ci_low"],
            "control_high": ctl["ci_high"], "control_verdict": ctl["verdict"],
        }  # fmt: skip
    out["can_tell"] = bool(row["p_min"] < 0.05 and out.get("control_verdict") == "above null")
    return out


def _factor(run: RunData, claim: Claim) -> dict[str, Any]:
    assert claim.factor is not None and claim.level is not None
    stored = run.outputs[claim.factor].astype(str) if claim.factor in run.outputs else pd.Series(dtype=str)
    if claim.level not in set(stored):
        return {}  # the level's cells are not stored yet (a run still under way, or stopped early): "not run"
    table = cell_contrasts(run, [("icl_it", "cosine"), ("icl_it", "demo_swap")], factors=[claim.factor])
    hit = table[(table["level_a"] == claim.level) & (table["quantity"] == "cosine")]
    if hit.empty:
        raise KeyError(
            f"{run.path}: no contrast of {claim.factor} = {claim.level} (levels: {sorted(set(table['level_a']))})"
        )
    row = hit.iloc[0]
    low, high = row["ci_low"], row["ci_high"]
    detectable = _detectable(low, high, int(row["n_blocks_a"]), len(table))
    levels = {str(r.level_a): r.mean_a for r in table[table["quantity"] == "cosine"].itertuples()}
    levels[str(row["level_b"])] = row["mean_b"]
    return {
        "value": row["mean_a"], "diff": row["diff"], "ci_low": low, "ci_high": high, "p_holm": row["p_holm"],
        "family": len(table), "margin": row["margin"], "verdict": row["verdict"], "detectable": detectable,
        "can_tell": _contrast_can_tell(row["verdict"], detectable, row["margin"]), "levels": levels,
        "reference": str(row["level_b"]),
    }  # fmt: skip


_KINDS: dict[str, Callable[[RunData, Claim], dict[str, Any]]] = {
    "anchors": _anchors,
    "demo_swap": lambda run, c: _null(run, c, "demo_swap"),
    "query_swap": lambda run, c: _null(run, c, "query_swap"),
    "factor": _factor,
}


def claim_rows(
    root: str | Path, claims: Sequence[Claim] = CLAIMS, *, loader: Callable[[Path], RunData] = load_run
) -> pd.DataFrame:
    """The summary table's rows (:data:`CLAIM_COLUMNS`), from the runs under ``root``.

    Parameters
    ----------
    root
        The suite's folder (``runs/paper``): one run directory per spec.
    claims
        The claims (:data:`CLAIMS`).
    loader
        Reads a run directory (:func:`iclit.analysis.load_run`; each run is read once).

    Returns
    -------
    pandas.DataFrame
        One row per claim; a claim whose run is not under ``root``, or (a factor claim) whose
        level has no stored trials there yet, keeps its text with "not run" and NaN numbers.
    """
    root = Path(root)
    runs: dict[str, RunData | None] = {}
    rows = []
    for claim in claims:
        if claim.run not in runs:
            path = root / claim.run
            runs[claim.run] = loader(path) if (path / "results.sqlite").exists() else None
        run = runs[claim.run]
        base = {"key": claim.key, "experiment": claim.experiment, "claim": claim.claim, "paper": claim.paper,
                "run": claim.run, "kind": claim.kind}  # fmt: skip
        found = _KINDS[claim.kind](run, claim) if run is not None else {}
        rows.append(base | found | _texts(claim, found))
    out = pd.DataFrame(rows)
    for col in CLAIM_COLUMNS:
        if col not in out:
            out[col] = np.nan
    return out[list(CLAIM_COLUMNS)]


def _ci(x: float, low: float, high: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(x)} [{f.format(low)}, {f.format(high)}]"


def _p(p: float) -> str:
    return "–" if not np.isfinite(p) else (f"{p:.2g}" if p >= 1e-4 else f"{p:.0e}")


def _texts(claim: Claim, r: Mapping[str, Any]) -> dict[str, str]:
    if not r:
        return {"iclit": "not run", "verdict_text": "–", "control_text": "–", "can_tell_text": "–"}
    margin = (
        f"margin ±{r['margin']:.3g}" if np.isfinite(r["margin"]) else "no margin: no positive control above its null"
    )
    verdict = f"{r['verdict']} (Holm p {_p(r['p_holm'])} of {r['family']}; {margin})"
    if claim.kind == "anchors":
        iclit = (
            f"ICL–IT {_ci(r['value'], r['value_low'], r['value_high'])}; anchor–ICL {r['anchor_icl']:.3f}, "
            f"anchor–IT {r['anchor_it']:.3f}; ICL–IT − anchor–ICL {_ci(r['diff'], r['ci_low'], r['ci_high'], True)}"
        )
        control = (
            f"IT–IT′ (other seed) {r['control_diff']:.3f}" if np.isfinite(r["control_diff"]) else "no second IT seed"
        )
    elif claim.kind == "factor":
        levels = ", ".join(f"{k}: {v:.3f}" for k, v in r["levels"].items())
        iclit = f"ICL–IT {levels}; {claim.level} − {r['reference']} {_ci(r['diff'], r['ci_low'], r['ci_high'], True)}"
        control = "– (a difference of cells: see the detectable difference)"
    else:
        null = "demo-swap" if claim.kind == "demo_swap" else "query-swap"
        iclit = f"ICL–IT {r['value']:.3f}; − {null} {_ci(r['diff'], r['ci_low'], r['ci_high'], True)}"
        if "control_diff" in r:
            name = PAIR_NAMES[r["control"]]
            control = (
                f"{name} − {null} {_ci(r['control_diff'], r['control_low'], r['control_high'], True)}: "
                f"{r['control_verdict']}"
            )
            if np.isfinite(r.get("fraction", np.nan)):
                control += f"; ICL–IT is {r['fraction']:+.2f} of it"
        else:
            control = "no positive control in this cell"
    if claim.kind.endswith("swap"):
        reach = f"smallest p {_p(r['p_min'])}"
        why = "its control is above the same null" if r.get("control_verdict") == "above null" else "its control is not"
        can = f"{'yes' if r['can_tell'] else 'no'}: {reach}; {why}"
    elif r["verdict"] in ("above null", "below null"):
        can = f"yes: it rejected (detects ±{r['detectable']:.3f} with 80% power)"
    else:
        can = (
            f"{'yes' if r['can_tell'] else 'no'}: detects ±{r['detectable']:.3f} (80% power), margin ±{r['margin']:.3g}"
        )
    return {"iclit": iclit, "verdict_text": verdict, "control_text": control, "can_tell_text": can}


def claims_markdown(rows: pd.DataFrame) -> str:
    """The summary as a Markdown table: claim | paper | iclit | verdict | positive control | can the design tell?"""
    out = [
        "| experiment | claim | paper | iclit (last layer, 95% CI over query blocks) | verdict | positive control "
        "| can the design tell? |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows.itertuples():
        cells = [r.experiment, r.claim, r.paper, r.iclit, r.verdict_text, r.control_text, r.can_tell_text]
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


BEGIN = "<!-- claims: begin (written by scripts/replication_tables.py --page; do not edit) -->"
END = "<!-- claims: end -->"


def with_claims(page: str, table: str) -> str:
    """``page`` with the block between :data:`BEGIN` and :data:`END` replaced by ``table``
    (:func:`claims_markdown`); a page without both markers is an error."""
    if BEGIN not in page or END not in page:
        raise ValueError(f"the page has no claims block ({BEGIN} … {END})")
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table.rstrip()}\n{END}{tail}"
