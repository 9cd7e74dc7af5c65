"""The spec's keys: :class:`SpecFields`, every field of :class:`ExperimentSpec` with its type,
default, allowed values and description (the user docs: ``iclit spec-schema``,
configs/README.md), in the order a spec file lists them.

The checks that span keys, the conversions and what the plan reads are
:class:`~iclit.experiments.spec.model.ExperimentSpec`'s, in :mod:`iclit.experiments.spec.model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, PlainValidator, Strict, Tag, model_validator

from iclit.experiments.spec.cluster import ClusterOptions
from iclit.experiments.spec.values import (
    ANALYSIS_NAMES,
    BASELINE_NAMES,
    DESIGNS,
    DTYPES,
    FROZEN,
    REQUIRED_ARMS,
    SAMPLER_NAMES,
    AnalysisField,
    ArmField,
    BaselineField,
    DemoTaskField,
    Design,
    DType,
    EquivalenceMargins,
    Factors,
    LayersField,
    OverridesField,
    RecipeNameField,
    SamplerName,
    ScalesField,
    SimilarityField,
    StrField,
    TaskOptions,
    TextField,
    listed,
    none_is,
    one_of,
    parse_factors,
)
from iclit.schema import Fraction, NonEmptyStr, NonNegInt, PosInt, StrictBool, distinct, expect, problem
from iclit.tasks.chat import PROMPT_FORMATS, PromptFormat
from iclit.tasks.draws import BLOCK_SETS, BlockSets
from iclit.tuning.recipe import RecipeOverrides, TuningRecipe

__all__ = ["SpecFields"]


class _Both:
    """`seed` and `seeds` both given (the `seed` field reports it)."""


def _no_both(v: Any) -> Any:
    if isinstance(v, _Both):
        raise problem("give `seed` or `seeds`, not both")
    return v


class SpecFields(BaseModel):
    """The fields of :class:`~iclit.experiments.spec.model.ExperimentSpec` (which adds the
    checks): what is fixed, what varies, how to run it, what to analyse."""

    model_config = FROZEN

    name: NonEmptyStr = Field("experiment", description="the experiment's name (run directories, reports)")
    description: TextField = Field("", description="what the experiment asks, for the report")
    model: NonEmptyStr = Field("gemma-3-270m", description="embedded alias, local directory, .gguf file or hub id")
    task: NonEmptyStr = Field(
        "sentiment", description="built-in task name or a data file (.jsonl, .json, .csv, .parquet)"
    )
    task_options: TaskOptions | None = Field(None, description="a data file's fields and kind, and the task's template")
    template: NonEmptyStr = Field("default", description="a named template of the task")
    instruction: StrictBool = Field(True, description="keep the template's instruction")
    prompt_format: Annotated[PromptFormat, one_of(PROMPT_FORMATS)] = Field(
        "raw",
        description="raw: the template's text as it is, on every model (the default; a model factor compares "
        "the same text); chat: every whole prompt (anchor query, ICL prompt, IT training prompt) as "
        "one user message of the model's chat template, the answer starting the assistant's reply "
        "(instruct models; iclit.tasks.chat)",
    )
    arms: Annotated[
        tuple[ArmField, ...],
        distinct("an arm"),
        BeforeValidator(listed),
        expect("a list of arm names", as_kind=True),
        none_is(REQUIRED_ARMS),
    ] = Field(
        REQUIRED_ARMS,
        description="arms to run; must include anchor, icl and it (it_seed2: IT with another seed; "
        "icl_reordered: ICL with the demonstrations rotated by one)",
    )
    k: NonNegInt = Field(4, description="demonstrations per resample (0: zero-shot, every arm reads the query alone)")
    resamples: PosInt = Field(
        8,
        description="demonstration sets drawn per cell and seed (with one query per set: "
        "the (query, demonstrations) draws)",
    )
    queries_per_set: PosInt = Field(
        1,
        description="queries read with each demonstration set (the crossed design): one "
        "ICL prefix and one IT adapter answer them all; distinct, never among "
        "the set's demonstrations, label-balanced; 1: one query per set",
    )
    sets_per_query: Annotated[
        Annotated[int, Strict(), Field(ge=1)] | None, expect(message="must be a positive integer or null, not {got}")
    ] = Field(
        None,
        description="demonstration sets that share the same queries (the demo-swap null compares a query's arms "
        "across them); null: 1 with one query per set, else 2",
    )
    block_sets: Annotated[BlockSets, one_of(BLOCK_SETS)] = Field(
        "drawn",
        description="how the later sets of a query block get their demonstrations: drawn (each its own draw) or "
        "flipped (the block's first set with every label changed: sets that must differ, the positive control of "
        "the demo-swap test; classification tasks, sets_per_query >= 2)",
    )
    it_seeds: PosInt = Field(
        1,
        description="IT adapters per demonstration set, each with its own seed (LoRA init, data "
        "order, dropout), trained in the same batched pass: `it` is seed 1's, "
        "it_seed2 … the others'; their spread is the IT seed noise",
    )
    equivalence_margin: Annotated[
        Annotated[Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)], Tag("number")]
        | Annotated[EquivalenceMargins, Tag("mapping")],
        Discriminator(lambda v: "mapping" if isinstance(v, (Mapping, EquivalenceMargins)) else "number"),
        expect("a number in (0, 1] or a mapping of margins per quantity"),
    ] = Field(
        EquivalenceMargins(),
        description="declared before the run, per quantity (raw, centred, update cosines: a number or 'ceiling'; "
        "agreement; kl; ceiling_fraction): the largest excess over a null that counts as no effect; an "
        "excess whose 90% CI lies inside ±margin is 'equivalent within ±margin'. A number: every cosine "
        "quantity. Default: the cosines follow the ceiling rule, a quarter of the excess of the cell's "
        "positive control (IT seed 1 vs 2, else ICL vs reordered ICL)",
    )
    seed: Annotated[NonNegInt | None, BeforeValidator(_no_both), expect("an integer >= 0")] = Field(
        None, description="one seed: the same as `seeds: [seed]`", exclude=True
    )
    seeds: Annotated[
        tuple[NonNegInt, ...],
        Field(min_length=1),
        distinct("a seed"),
        expect("a non-empty list of integers >= 0", as_kind=True),
    ] = Field((0,), description="seeds of the draws and the tuning")
    sampler: Annotated[SamplerName | None, one_of(tuple(sorted(SAMPLER_NAMES)), null=True)] = Field(
        None, description="base demonstration sampler; null: balanced for classification, random otherwise"
    )
    similarity: SimilarityField = Field(
        "random",
        description="random (the base sampler), most or least similar demonstrations (all-MiniLM-L6-v2 embeddings)",
    )
    wrong_labels: Fraction = Field(0.0, description="fraction of demonstrations given a wrong label")
    demo_task: DemoTaskField = Field(
        None, description="demonstrations from another task; null or 'same': the query's task"
    )
    recipe: Annotated[
        TuningRecipe,
        none_is({}),
        expect(f"a mapping of recipe fields ({', '.join(RecipeOverrides.model_fields)})", as_kind=True),
    ] = Field(default_factory=TuningRecipe, description="the IT recipe (see TuningRecipe)")
    recipes: Annotated[
        dict[RecipeNameField, OverridesField], none_is({}), expect("a mapping of name -> recipe fields", as_kind=True)
    ] = Field(default_factory=dict, description="named recipes for the `recipe` factor, each laid over `recipe`")
    design: Annotated[Design, one_of(DESIGNS)] = Field(
        "grid",
        description="grid: every combination of the factors' values; "
        "separate: one factor at a time around the base values",
    )
    factors: Annotated[
        dict[str, tuple[Any, ...]], PlainValidator(parse_factors, json_schema_input_type=Factors | None)
    ] = Field(default_factory=dict, description="factor -> list of values (see Factors)")
    chunk_size: PosInt = Field(
        8,
        description="resamples run and stored together; fixed by the spec, so a resumed run "
        "computes what an uninterrupted one would",
    )
    batch_size: PosInt = Field(16, description="prompts per forward pass")
    max_new_tokens: PosInt = Field(48, description="tokens generated per answer (generation tasks)")
    device: Annotated[StrField | None, expect("a non-empty string or null")] = Field(
        None, description="cpu, cuda, cuda:1 …; null: cuda if available, else cpu"
    )
    dtype: Annotated[DType | None, one_of(DTYPES, null=True)] = Field(
        None, description="null: bfloat16 on cuda, float32 on cpu"
    )
    record_similarity: Annotated[
        Annotated[bool, Strict()] | None, expect(message="must be true or false or null, not {got}")
    ] = Field(
        None,
        description="record the demonstration–query similarity per trial; null: when `similarity` is varied or set",
    )
    fast: StrictBool = Field(
        True, description="the fast engine (prefix cache, batched adapters); false: the reference path"
    )
    store_states: StrictBool = Field(
        True,
        description="keep the hidden states (states/*.safetensors), from which every "
        "similarity is computed; false: behaviour only (predictions, scores, "
        "losses), for very large runs",
    )
    memory_budget: Annotated[StrField | None, expect("a memory size such as 8GiB, or null")] = Field(
        None,
        description="memory the batched IT path may plan for (e.g. 8GiB); null: half the free memory (RAM on the "
        "CPU, CUDA memory on a GPU). Changes speed and peak memory, not results",
    )
    adapters_per_pass: Annotated[
        Annotated[int, Strict(), Field(ge=1)] | None, expect(message="must be a positive integer or null, not {got}")
    ] = Field(
        None, description="LoRA adapters trained together in one pass; null: planned from memory_budget (at most 64)"
    )
    max_train_tokens: Annotated[
        Annotated[int, Strict(), Field(ge=1)] | None, expect(message="must be a positive integer or null, not {got}")
    ] = Field(
        None,
        description="padded tokens per training micro-batch; null: planned (at most 768 on the CPU, 32768 on a GPU)",
    )
    baselines: Annotated[
        tuple[BaselineField, ...],
        distinct("a baseline"),
        BeforeValidator(listed),
        expect("a list of baselines (" + ", ".join(BASELINE_NAMES) + ")", as_kind=True),
        none_is(()),
    ] = Field(
        (),
        description="extra similarities per trial x layer, computed from the stored states: centered "
        "(anisotropy-corrected cosines), shuffled (ICL of trial i vs IT of trial i+1 among a cell's trials), "
        "update (cosine of the ICL and IT updates from the anchor), noise_ceiling (IT vs IT with another "
        "seed: one more tuning), cka (linear CKA of each arm pair across all of a cell's queries, >= 3), "
        "query_mean (the three pairs over the query's mean state)",
    )
    analyses: Annotated[
        tuple[AnalysisField, ...],
        distinct("an analysis"),
        BeforeValidator(listed),
        expect("a list of analyses (" + ", ".join(ANALYSIS_NAMES) + ")", as_kind=True),
        none_is(()),
    ] = Field(
        (),
        description="causal tests run in the engine with the model, stored per trial (`iclit results --metric patch "
        "/ steer`, the report). patch: the query's last-token state at state index l replaced by its ICL "
        "state or its IT state in the anchor run, the ICL state in the tuned model's query run, the IT state "
        "in the ICL run; steer: the mean update h_arm - h_anchor of the set's other queries (ICL or IT) "
        "added, times each scale, to the query's anchor run, beside random directions of the same norm "
        "(needs queries_per_set >= 2). Classification: label distributions over the task's labels; "
        "generation: the log-probability of the gold answer's first token. Cost: one last-token forward "
        "per layer and run, see configs/paper/causal.yaml",
    )
    patch_layers: LayersField = Field(
        None,
        description="state indices l patched (0: block 0's input, L: the final norm's output, as the stored "
        "states); null: every 2nd, L, L-2, ... down to 1; 'all': 1..L",
    )
    steer_layers: LayersField = Field(
        None, description="state indices l steered; null: every 3rd, L, L-3, ... down to 1; 'all': 1..L"
    )
    steer_scales: ScalesField = Field(
        (0.5, 1.0, 2.0, 4.0), description="multipliers of the steering vectors (1: the mean update itself)"
    )
    steer_null_draws: PosInt = Field(
        1,
        description="random directions per query, layer and scale, each scaled to the norm of the ICL and of the IT "
        "vector (the null of steering)",
    )

    cluster: ClusterOptions | None = Field(
        None,
        description="how the run spreads over Ray actors or SLURM jobs (actors per GPU, threads, retries, the "
        "SLURM job array); changes no trial",
    )

    @model_validator(mode="before")
    @classmethod
    def _seed_or_seeds(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "seed" in data and "seeds" in data:
            return {**data, "seed": _Both()}
        return data
