"""Captured hidden states on disk: one safetensors file per chunk of trials, under RUN/states/.

A chunk's file holds, for every state name (``anchor``, ``icl``, ``it``, ``it_seed2``,
``icl:qmean``, ``it:step4``, …), one array ``[n, L+1, d]`` whose row i belongs to the
chunk's i-th trial key, plus ``reference_mean`` ``[L+1, d]`` when the centred baseline was
asked for. The trial keys are in the file's metadata too, so a file explains itself.

Writes are atomic (a temporary file in the same folder, flushed, then renamed) and happen
before the chunk's rows are committed to the results store: a process killed in between
leaves a file that no trial row names, which the rerun of that chunk overwrites (the name is
a hash of the chunk's trial keys). Readers only open files that trial rows name.

Only numpy and safetensors: no torch, no model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from iclit._atomic import atomic_write

__all__ = ["STATES_DIR", "FORMAT", "chunk_file_name", "write_chunk_states", "read_chunk_states"]

STATES_DIR = "states"
FORMAT = "iclit-states-1"


def chunk_file_name(keys: Sequence[str]) -> str:
    """``states/<hash of the trial keys>.safetensors``, relative to the run directory."""
    digest = hashlib.sha256("\n".join(keys).encode("ascii")).hexdigest()[:32]
    return f"{STATES_DIR}/{digest}.safetensors"


def write_chunk_states(run_dir: str | Path, keys: Sequence[str], arrays: Mapping[str, np.ndarray]) -> str:
    """Write one chunk's states atomically; returns the file's name relative to ``run_dir``.

    arrays: name → ``[len(keys), L+1, d]`` (or ``[L+1, d]`` for ``reference_mean``), any float
    dtype (stored as float32).
    """
    from safetensors.numpy import save_file

    n = len(keys)
    tensors: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
        if name != "reference_mean" and a.shape[0] != n:
            raise ValueError(f"states {name!r}: {a.shape[0]} rows for {n} trial keys")
        tensors[name] = a
    rel = chunk_file_name(keys)
    atomic_write(
        Path(run_dir) / rel,
        lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, "trial_keys": json.dumps(list(keys))}),
    )
    return rel


def read_chunk_states(path: str | Path, names: Sequence[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """(trial keys, name → array) of one chunk file; ``names``: only those arrays."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an iclit states file (format {meta.get('format')!r})")
        keys = json.loads(meta["trial_keys"])
        wanted = f.keys() if names is None else [n for n in names if n in f.keys()]
        return keys, {name: f.get_tensor(name) for name in wanted}
