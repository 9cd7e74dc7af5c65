"""What the engine and the tuning both run on, below both: decoder passes over padded
batches and shared prompt prefixes, micro-batches (:mod:`iclit.core.batching`), and the token
ids of answers and labels (:mod:`iclit.core.tokens`). Neither imports the engine or the
tuning, so those two never import each other's internals."""
