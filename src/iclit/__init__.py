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

from iclit.experiments.compare import Comparison, compare, run_comparison
from iclit.models import LoadedModel, load_model
from iclit.tasks import Example, Task, Template, get_task
from iclit.tuning import TuningRecipe

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "Example",
    "LoadedModel",
    "Task",
    "Template",
    "TuningRecipe",
    "compare",
    "get_task",
    "load_model",
    "run_comparison",
]
