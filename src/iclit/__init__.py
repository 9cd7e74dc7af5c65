"""iclit: is in-context learning implicit instruction tuning?

Compares the last-prompt-token hidden states of three arms of a causal LM (Duan et al.,
"Exploring the Relationship between In-Context Learning and Instruction Tuning"):
the query alone (anchor), k demonstrations + the query (ICL), and the query alone after
tuning on those k demonstrations (IT).

    >>> import iclit
    >>> df = iclit.compare(model="gemma-3-270m", task="sentiment", k=4, resamples=30)
"""

import os

# Large CPU tensors on transparent huge pages (PyTorch's allocator reads this once, at its
# first large allocation). Full fine-tuning allocates [V, d] gradients every step, and fresh
# 4 KiB pages cost about a third of its step time on the 2-core reference machine
# (benchmarks/full_ft_pages.py). Set THP_MEM_ALLOC_ENABLE=0 before importing iclit to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from iclit._lazy import lazy_exports

__version__ = "0.1.0"

# name -> module: imported on first use, so `import iclit` (and `iclit --help`) loads no torch
_EXPORTS = {
    "Comparison": "iclit.api",
    "compare": "iclit.api",
    "run_comparison": "iclit.api",
    "LoadedModel": "iclit.models",
    "load_model": "iclit.models",
    "Example": "iclit.tasks",
    "Task": "iclit.tasks",
    "Template": "iclit.tasks",
    "get_task": "iclit.tasks",
    "TuningRecipe": "iclit.tuning.recipe",
    "load_states": "iclit.analysis.states",
    "load_run": "iclit.analysis.rundata",
    "compute_metric": "iclit.analysis.registry",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
