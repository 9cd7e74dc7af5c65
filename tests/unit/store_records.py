"""Fake trial records for the store tests (importable without iclit)."""

PAIRS = ("anchor_icl", "anchor_it", "icl_it")


def record(i: int, layers: int = 4, cell: str = "cell-a") -> dict:
    return {
        "trial_key": f"trial-{i:04d}",
        "cell_key": cell,
        "seed": 0,
        "resample": i,
        "query_id": f"q{i}",
        "cosines": {p: [1.0 - 0.01 * (i + j + layer) for layer in range(layers)] for j, p in enumerate(PAIRS)},
        "scores": {"anchor": 1.0, "icl": float(i % 2), "it": 0.0},
        "outputs": {"query": f"query {i}", "gold": "pos", "predictions": {"anchor": "pos", "icl": "neg", "it": "pos"}},
        "demo_similarity": 0.5,
        "n_wrong": 0,
        "seconds": 0.1,
    }
