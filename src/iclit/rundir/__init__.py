"""The run-directory format, read and written without the runner: ``results.sqlite`` (the
trials, their outputs, the runs, the models and the cells' settings; :mod:`iclit.rundir.store`)
and ``states/*.safetensors`` (every arm's last-token states per chunk;
:mod:`iclit.rundir.statefiles`). The experiments write it; the analysis and the report read
it through this package alone."""

from __future__ import annotations

from iclit._lazy import lazy_exports

_EXPORTS = {
    "Store": "iclit.rundir.store",
    "TrialRecord": "iclit.rundir.store",
    "open_store": "iclit.rundir.store",
    "read_chunk_states": "iclit.rundir.statefiles",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
