"""The whole-cell tables of a run directory, kept on disk so they are computed once.

A cell's tables (:func:`iclit.analysis.cells.cell_tables`: the nulls' permutation tests and
bootstraps, CKA / RSA, behaviour, dose, seeds) cost seconds to minutes; the HTML report,
``iclit results --tests``, the exports and ``scripts/replication_tables.py`` all read them.
Each cell's tables are stored as Parquet files under ``<run_dir>/analysis/<key>/``, where the
key hashes everything they depend on: the cell's trial keys in order (a trial key hashes
everything that determines the trial, so its stored states), the cell's settings, the
analysis parameters (margin, permutations, bootstrap draws, seed) and the source of the
analysis modules that compute them. Any change gives a new key, so an entry is never stale;
old entries are only unused (delete ``analysis/`` to reclaim the space). A run directory that
cannot be written is analysed without the cache. ``ICLIT_ANALYSIS_CACHE=0`` turns it off.

Reused trials (``iclit run --reuse``) carry their cells' entries with them
(:func:`copy_entries`), so a base cell shared by several specs is analysed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["CACHE_DIR", "enabled", "entry_key", "load", "save", "copy_entries"]

log = logging.getLogger(__name__)

CACHE_DIR = "analysis"
_MODULES = (
    "cache",
    "cells",
    "nulls",
    "permutations",
    "dose",
    "outputs",
    "states",
    "stats/arrays",
    "stats/intervals",
    "stats/multiplicity",
    "stats/permutation",
    "stats/representation",
    "stats/resampling",
)


def enabled() -> bool:
    return os.environ.get("ICLIT_ANALYSIS_CACHE", "1") not in ("0", "false", "no", "off")


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """The analysis modules' source: a change to how the tables are computed gives new keys."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _MODULES:
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()


def entry_key(cell_key: str, trial_keys: Sequence[str], settings: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """The cache key of one cell's tables (hex digest)."""
    payload = json.dumps(
        {
            "cell": cell_key,
            "trials": list(trial_keys),
            "settings": settings,
            "params": params,
            "code": _code_digest(),
            "pandas": pd.__version__,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load(run_dir: str | Path, key: str) -> dict[str, pd.DataFrame] | None:
    """The tables stored under ``key``, or None (no entry, or one that cannot be read)."""
    folder = Path(run_dir) / CACHE_DIR / key
    if not (folder / "done").exists():
        return None
    try:
        names = json.loads((folder / "done").read_text())
        return {name: pd.read_parquet(folder / f"{name}.parquet") for name in names}
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable cache entry, recomputing (%s)", folder, e)
        return None


def save(run_dir: str | Path, key: str, tables: Mapping[str, pd.DataFrame]) -> None:
    """Store ``tables`` under ``key``: written into a temporary folder, then renamed, so an
    entry is whole or absent. A run directory that cannot be written is left as it is."""
    root = Path(run_dir) / CACHE_DIR
    try:
        root.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.", suffix=".partial"))
    except OSError as e:
        log.info("%s: not caching the cell tables (%s)", root, e)
        return
    try:
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "done").write_text(json.dumps(list(tables)))
        os.replace(tmp, root / key)
    except Exception as e:  # best effort: another process stored it first, a full disk, a column Parquet cannot hold
        log.info("%s: cache entry not stored (%s)", root / key, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_entries(source_dir: str | Path, run_dir: str | Path) -> int:
    """Copy the cache entries of ``source_dir`` (a run directory, or its results .sqlite, as
    ``--reuse`` takes) that ``run_dir`` lacks (keys hash their content, so an entry is valid
    wherever its trials are); returns how many were copied."""
    source = Path(source_dir)
    src, dst = (source.parent if source.suffix == ".sqlite" else source) / CACHE_DIR, Path(run_dir) / CACHE_DIR
    if not src.is_dir() or (dst.exists() and src.resolve() == dst.resolve()):
        return 0
    copied = 0
    for entry in src.iterdir():
        if entry.name.startswith(".") or not (entry / "done").exists() or (dst / entry.name).exists():
            continue
        tmp = None
        try:
            dst.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dst, prefix=f".{entry.name}.", suffix=".partial"))
            shutil.copytree(entry, tmp, dirs_exist_ok=True)
            os.replace(tmp, dst / entry.name)
            copied += 1
        except OSError as e:
            log.info("%s: cache entry not copied (%s)", entry, e)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return copied
