"""Experiment specs: a YAML file (or Python) validated into one typed :class:`ExperimentSpec`.

A spec names what is fixed (model, task, template, k, …, the IT recipe) and the factors to
vary. Every key is optional except ``factors`` if you want a sweep::

    name: smoke
    model: gemma-3-270m          # embedded alias, local dir, .gguf file or hub id
    task: sentiment              # built-in task name or a data file
    template: default            # a named template of the task
    instruction: true            # keep the template's instruction
    arms: [anchor, icl, it]
    k: 4                         # demonstrations per resample
    resamples: 8                 # (query, demonstrations) draws per cell and seed
    seeds: [0]                   # or `seed: 0`
    sampler: null                # base sampler: balanced (classification) / random
    similarity: random           # random (the base sampler) | most | least similar demos
    wrong_labels: 0.0            # fraction of demonstrations given a wrong label
    demo_task: null              # demonstrations from another task (null: the query's)
    recipe:                      # the IT recipe (fields of iclit.tuning.TuningRecipe)
      method: lora               # lora | full
      rank: 8
      alpha: 16
      targets: [q_proj, v_proj]
      lr: null                   # null: 1e-3 for LoRA, 1e-5 for full fine-tuning
      epochs: 12
      capture_steps: []          # also read IT after these optimiser steps (the dose curve)
    recipes:                     # named recipes for the `recipe` factor, each laid over `recipe`
      full: {method: full, epochs: 5}
    design: grid                 # grid: every combination; separate: one factor at a time
    factors:                     # factor -> list of values
      k: [2, 4, 8]
      similarity: [random, most, least]
      wrong_labels: [0.0, 0.5, 1.0]
      demo_task: [null, translation-en-cs]
      template: [default, qa]
      instruction: [true, false]
      model: [gemma-3-270m, smollm2-135m-instruct]
      recipe: [base, full, {epochs: 5}]   # a name in `recipes` ("base" = `recipe`) or a mapping
    chunk_size: 8                # resamples run (and stored) together; fixed by the spec
    batch_size: 16               # prompts per forward pass
    max_new_tokens: 48           # generation tasks
    device: null                 # null: cuda if available, else cpu
    dtype: null                  # null: bf16 on cuda, fp32 on cpu
    record_similarity: null      # record demo–query similarity per trial (null: when used)
    fast: true                   # the fast engine (prefix cache, batched adapters); false: reference path
    store_states: true           # keep the hidden states (states/*.safetensors)
    baselines: []                # extra similarities beside the three pairs, per trial × layer:
                                 #   centered, shuffled, update, noise_ceiling, cka, query_mean
    analyses: []                 # causal tests run with the model: patch, steer (patch_layers,
                                 #   steer_layers, steer_scales, steer_null_draws; configs/paper/causal.yaml)

With ``design: grid`` the cells are all combinations of the factors' values; with
``separate`` each factor is varied alone while the others keep their base value (the
top-level key of the same name), and cells shared between factors run once.

A data file as the task: ``task_options`` says how its records become examples (as ``iclit
compare --input-field … --output-field … --kind …`` does) and may lay a template over the
task's own (a data file's is ``Input: …`` / ``Output:`` with no instruction); ``template:
default`` selects it::

    task: data/reviews.csv
    task_options:
      input_field: text          # default: input
      output_field: label        # default: output
      kind: classification       # classification | generation
      verbalizer: {0: negative, 1: positive}   # raw output -> label word
      template:                  # fields of iclit.tasks.Template
        instruction: Is the review positive or negative?
        input_prefix: "Review: "
        output_prefix: "Sentiment:"
        demo_sep: "\\n\\n"        # also io_sep, answer_sep, instruction_sep

Every key, its type, default and meaning: ``iclit spec-schema`` (the JSON Schema of
:class:`ExperimentSpec`, whose field descriptions are these docs) and configs/README.md.

Validation collects every problem, each with its path in the file and its line::

    factors.k[2]: must be an integer >= 0, not -3 (line 14)
    recipe.method: must be one of lora, full, not 'qlora' (line 9)

>>> spec = load_spec("configs/examples/smoke.yaml")
>>> spec = ExperimentSpec(model="tiny-random-llama", factors={"k": (2, 4)}).validate()
"""

from __future__ import annotations

from iclit.experiments.spec.model import ExperimentSpec
from iclit.experiments.spec.parse import load_spec, loads_spec, parse_spec
from iclit.experiments.spec.problems import SpecError, SpecProblem
from iclit.experiments.spec.values import (
    ARM_NAMES,
    BASELINE_NAMES,
    DESIGNS,
    DTYPES,
    FACTORS,
    REQUIRED_ARMS,
    SAMPLER_NAMES,
    SIMILARITY_MODES,
    Design,
    Factors,
    FactorValue,
    Similarity,
    TaskOptions,
    TemplateFields,
    factor_label,
)

__all__ = [
    "FACTORS",
    "SIMILARITY_MODES",
    "DESIGNS",
    "DTYPES",
    "ARM_NAMES",
    "REQUIRED_ARMS",
    "BASELINE_NAMES",
    "SAMPLER_NAMES",
    "Design",
    "Similarity",
    "FactorValue",
    "ExperimentSpec",
    "Factors",
    "TaskOptions",
    "TemplateFields",
    "SpecProblem",
    "SpecError",
    "load_spec",
    "loads_spec",
    "parse_spec",
    "factor_label",
]
