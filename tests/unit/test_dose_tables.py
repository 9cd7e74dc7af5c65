"""The dose's matched-step null tests (iclit.analysis.dose.dose_tables) on simulated states:
with the reordered-ICL arm stored, the ceiling rule has its positive control and every
ICL–IT test gets a declared margin and a TOST; without it, none."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from iclit.analysis.dose import dose_tables
from iclit.analysis.nulls import Units

MARGIN = {"raw": "ceiling", "centred": "ceiling", "update": "ceiling", "ceiling_fraction": 0.25}
LABELS = ["pos", "neg"]


def _cell(seed: int = 0, blocks: int = 8, queries: int = 4, d: int = 24, n_states: int = 3):
    """A dose cell without demonstration-specific agreement: every arm is the query's own
    direction plus its set's direction (IT's own set for ICL, IT and reordered ICL alike) plus
    noise; two captured steps; label distributions from the same draw."""
    rng = np.random.default_rng(seed)
    sets = np.repeat(np.arange(2 * blocks), queries)
    block = sets // 2
    query = np.asarray([f"q{b}_{i}" for b in range(blocks) for _ in range(2) for i in range(queries)], dtype=object)
    label = np.asarray([LABELS[i % 2] for _ in range(2 * blocks) for i in range(queries)], dtype=object)
    units = Units(np.zeros(len(sets), dtype=np.int64), sets, block, query, label)
    q_dir = {q: rng.normal(size=(n_states, d)) for q in np.unique(query)}
    s_dir = rng.normal(size=(2 * blocks, n_states, d))
    base = np.stack([q_dir[q] for q in query]) + 0.5 * s_dir[sets]

    def arm(scale: float) -> np.ndarray:
        return base + scale * rng.normal(size=base.shape)

    states = {"anchor": np.stack([q_dir[q] for q in query]), "icl": arm(0.5), "icl_reordered": arm(0.5)}
    states |= {f"it:step{s}": arm(0.5 + 0.2 * s) for s in (1, 2)}
    p_icl = rng.uniform(0.2, 0.8, size=len(sets))
    p_steps = np.clip(p_icl[:, None] + rng.normal(scale=0.1, size=(len(sets), 2)), 0.01, 0.99)
    outputs = pd.DataFrame(
        {
            "label_probs": [{"icl": {"pos": p, "neg": 1 - p}} for p in p_icl],
            "dose": [{"label_probs": [[p, 1 - p] for p in row]} for row in p_steps],
        }
    )
    return states, outputs, units


@pytest.mark.parametrize("with_control", [True, False])
def test_matched_step_tests_have_a_margin_only_with_the_reorder_control(with_control):
    states, outputs, units = _cell()
    if not with_control:
        states.pop("icl_reordered")
    tests = dose_tables(states, outputs, units, LABELS, margin=MARGIN, n_perm=200)["matched_tests"]
    icl_it = tests[(tests["pair"] == "icl_it") & (tests["centring"] == "raw")]
    assert len(icl_it) and set(icl_it["null"]) == {"query_swap", "demo_swap"}
    if with_control:
        assert set(icl_it["ceiling"]) == {"ceiling_icl"}
        assert np.isfinite(icl_it["margin"]).all() and (icl_it["margin"] > 0).all()
        assert np.isfinite(icl_it["p_tost"]).all()
    else:
        assert icl_it["margin"].isna().all() and icl_it["p_tost"].isna().all()
