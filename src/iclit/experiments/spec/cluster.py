"""The ``cluster`` section of a spec: how a run spreads over Ray actors or SLURM jobs.

None of it changes what a trial computes (no trial key depends on it); the CLI's flags
(``--actors-per-gpu``, ``--worker-threads``, ``--partition`` …) override it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict

from iclit.schema import NonEmptyStr, NonNegInt, PosInt, expect

__all__ = ["ClusterOptions", "SlurmOptions"]

FROZEN = ConfigDict(extra="forbid", frozen=True)
_OptPosInt = Annotated[
    Annotated[int, Strict(), Field(ge=1)] | None, expect(message="must be a positive integer or null, not {got}")
]
_OptStr = Annotated[NonEmptyStr | None, expect("a non-empty string or null")]


class SlurmOptions(BaseModel):
    """``iclit run --backend slurm``: one job array over the run's shards (submitit)."""

    model_config = FROZEN

    shards: PosInt = Field(8, description="jobs in the array: the plan's chunks split into this many shards")
    partition: _OptStr = Field(None, description="SLURM partition (null: the cluster's default)")
    account: _OptStr = Field(None, description="SLURM account to charge (null: your default)")
    time_min: PosInt = Field(240, description="wall-clock limit of each job, minutes")
    gpus_per_task: NonNegInt = Field(0, description="GPUs per job (0: a CPU job)")
    cpus_per_task: PosInt = Field(4, description="CPU cores per job (torch threads of the job)")
    mem_gb: _OptPosInt = Field(None, description="memory per job, GiB (null: the partition's default)")
    array_parallelism: _OptPosInt = Field(None, description="jobs of the array running at once (null: no limit)")
    constraint: _OptStr = Field(None, description="SLURM --constraint (node features), e.g. a GPU type")


class ClusterOptions(BaseModel):
    """Resources of Ray actors and SLURM jobs; retries after a worker dies."""

    model_config = FROZEN

    actors_per_gpu: _OptPosInt = Field(
        None,
        description="Ray actors sharing one GPU (each asks Ray for 1/n of it); null: planned from memory_budget "
        "and the GPU's memory when both are known, else 1",
    )
    worker_threads: PosInt = Field(1, description="torch CPU threads of each Ray actor (it asks Ray for as many CPUs)")
    max_retries: NonNegInt = Field(
        2,
        description="times a chunk (Ray) or a shard's job (SLURM) is retried on another "
        "worker after its worker died, before the run stops with an error",
    )
    slurm: SlurmOptions = Field(default_factory=SlurmOptions, description="the SLURM launcher's job settings")

    def to_dict(self) -> dict[str, Any]:
        """The options given, as plain data (what the spec file holds)."""
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("actors_per_gpu", "worker_threads", "max_retries")
            if k in self.model_fields_set
        }
        if "slurm" in self.model_fields_set:
            out["slurm"] = {
                k: getattr(self.slurm, k) for k in type(self.slurm).model_fields if k in self.slurm.model_fields_set
            }
        return out
