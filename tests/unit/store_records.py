"""Fake trial records for the store tests (importable without iclit)."""

PAIRS = ("anchor_icl", "anchor_it", "icl_it")
STATES_FILE = "states/fake.safetensors"
"""Where the fake records say their states are (row i of this file for record i)."""


def record(i: int, layers: int = 4, cell: str = "cell-a", states_file: str | None = STATES_FILE) -> dict:
    return {
        "trial_key": f"trial-{i:04d}",
        "cell_key": cell,
        "seed": 0,
        "resample": i,
        "query_id": f"q{i}",
        "n_layers": layers,
        "scores": {"anchor": 1.0, "icl": float(i % 2), "it": 0.0},
        "outputs": {"query": f"query {i}", "gold": "pos", "predictions": {"anchor": "pos", "icl": "neg", "it": "pos"}},
        "demo_similarity": 0.5,
        "n_wrong": 0,
        "seconds": 0.1,
        "states_file": states_file,
        "states_row": None if states_file is None else i,
    }
