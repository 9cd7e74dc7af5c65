"""The engine: every arm of a trial computed on a loaded model — the arms registry
(:mod:`iclit.engine.arms`; what an arm is given and returns, :mod:`iclit.engine.readout`; the
tuned arms, :mod:`iclit.engine.tuned_arm`), capture of last-token states with prefix reuse
(:mod:`iclit.engine.capture`), one pass over a chunk of draws (:mod:`iclit.engine.evaluate`),
the memory planner (:mod:`iclit.engine.memory`) and the causal interventions (patching,
steering; :mod:`iclit.engine.causal`, :mod:`iclit.engine.interventions`). It uses the
tuning (:mod:`iclit.tuning`) for the IT arm and :mod:`iclit.core` below both."""
