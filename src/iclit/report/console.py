"""The console tables of a one-cell comparison (``iclit compare``): each pair's cosine, each
pair against its nulls, the IT seed noise, and each arm's score — from the comparison's
``metrics.json`` and ``config.json`` contents."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from iclit.analysis.nulls import PAIR_NAMES
from iclit.report.nulls import PAIR_TEXT
from iclit.report.numbers import interval, num, pvalue

__all__ = ["print_summary"]

console = Console()


def print_summary(m: dict, cfg: dict) -> None:
    """The comparison's tables: each pair's cosine (last layer, mean over layers), accuracy per arm."""
    from iclit.analysis.similarity import PAIRS

    design = (
        f"{cfg['resamples']} sets × {cfg['queries_per_set']} queries"
        if cfg.get("queries_per_set", 1) > 1
        else f"n={cfg['resamples']}"
    )
    table = Table(title=f"{cfg['model']} · {cfg['task']} · k={cfg['k']} · {design} · seed={cfg['seed']}")
    table.add_column("pair")
    table.add_column("last layer: mean ± std [95% CI]")
    table.add_column("mean over layers [95% CI]")
    pairs = [
        *(p for p in PAIRS if p in m["last_layer"]),  # none without stored states (store_states: false)
        *(p for p in m["last_layer"] if p not in PAIRS and "_step" not in p),
    ]  # dose steps: trials.jsonl
    for pair in pairs:
        a, b = m["last_layer"][pair], m["mean_over_layers"][pair]
        table.add_row(
            pair.replace("_", "–") if pair in PAIRS else pair,
            f"{num(a['mean'])} ± {num(a['std'])} [{num(a['ci_low'])}, {num(a['ci_high'])}]",
            interval(b["mean"], b["ci_low"], b["ci_high"]),
        )
    if pairs:
        console.print(table)
    else:
        console.print("no similarities: the run stored no hidden states (store_states: false)", highlight=False)
    _print_tests(m.get("tests") or [], cfg, m.get("seeds"))
    score = next(k for k in ("accuracy", "exact_match", "chrf") if k in m)
    arms = Table(title=f"per-arm {score}")
    arms.add_column("arm")
    arms.add_column(f"{score} [95% CI]")
    for arm, s in m[score].items():
        arms.add_row(arm, interval(s["mean"], s["ci_low"], s["ci_high"]))
    console.print(arms)
    loss = m["it_final_loss"]
    console.print(  # a null loss: nothing tuned (k = 0)
        f"ICL–IT prediction agreement {num(m['icl_it_agreement'])}; IT final training loss "
        f"mean {num(loss['mean'], '{:.4f}')}, max {num(loss['max'], '{:.4f}')}; {num(cfg['seconds'], '{:.0f}')} s on "
        f"{cfg['device'] or 'the stored device'}",
        highlight=False,
    )


def _print_tests(rows: list[dict], cfg: dict, seeds: list[dict] | None = None) -> None:
    """Each pair's last-layer cosine against its query-swap and demo-swap nulls (metrics.json ``tests``)."""
    if not rows:
        if cfg.get("queries_per_set", 1) == 1:
            console.print(
                "no query-swap / demo-swap nulls: one query per set (--queries-per-set 2 or more)", highlight=False
            )
        return
    table = Table(
        title="last layer vs the nulls: excess = observed − null [95% CI over query blocks]; p: Holm over "
        "the last layer's tests (floor: the smallest p the design allows)"
    )
    for col in ("pair", "cosine", "query-swap excess", "demo-swap excess"):
        table.add_column(col)
    for pair, label in PAIR_TEXT.items():
        got = {r["null"]: r for r in rows if r["pair"] == pair}
        if not got:
            continue
        cells = [label, f"{next(iter(got.values()))['observed']:.3f}"]
        for null in ("query_swap", "demo_swap"):
            r = got.get(null)
            cells.append(
                f"{interval(r['diff'], r['ci_low'], r['ci_high'], '{:+.3f}')}\n"
                f"p={pvalue(r['p_holm'])} (floor {pvalue(r.get('p_min'))}) {r['verdict']}"
                if r
                else "–"
            )
        table.add_row(*cells)
    console.print(table)
    n = rows[0]
    for r in rows:
        if r.get("role", "test") == "test" and r["pair"] == "icl_it" and r["null"] == "demo_swap" and r.get("ceiling"):
            console.print(
                f"ICL–IT demo-swap specificity: "
                f"{interval(r['fraction'], r['fraction_low'], r['fraction_high'], '{:+.2f}')} of the "
                f"{PAIR_NAMES.get(r['ceiling'], r['ceiling'])} ceiling ({num(r['ceiling_diff'], '{:+.3f}')}); "
                f"margin {_margin(r['margin'])}",
                highlight=False,
            )
    for r in seeds or ():
        if r["pair"] == "icl_it":
            console.print(
                f"IT seed noise, last layer: ICL–IT {num(r['seed1'])} with the first seed, {num(r['seed2'])} "
                f"with the second; per-pair between-seed SD {num(r['unit_sd'])}",
                highlight=False,
            )
    console.print(
        f"{n['n_units']} (query, set) pairs in {n['n_blocks']} query blocks; equivalence margins "
        f"{_margins(cfg.get('equivalence_margin'))}; every layer and centring: "
        f"{cfg.get('run_dir', 'RUN')}/tests.csv",
        highlight=False,
    )


def _margin(m: float | None) -> str:
    """A row's margin: ±m, or none where the ceiling rule found no positive ceiling."""
    return f"±{num(m, '{:.3g}')}" if num(m) != "–" else "none (no positive ceiling)"


def _margins(declared: object) -> str:
    """The declared margins in one phrase (a number: every cosine; a mapping: per quantity)."""
    from iclit.analysis.margins import margins

    m = margins(declared)
    cos = {k: m[k] for k in ("raw", "centred", "update")}
    rule = f"{m['ceiling_fraction']:g} × the ceiling's excess"
    text = ", ".join(f"{k} {rule if v == 'ceiling' else f'±{v:g}'}" for k, v in cos.items())
    return f"{text}; agreement ±{m['agreement']:g}; KL ±{m['kl']:g} nats"
