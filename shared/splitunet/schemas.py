"""Request and response bodies of the site API (``/v1`` on a site service).

Both sides import these models: the site service parses them, the aggregator's site client builds them. Tensors
never travel in JSON: ``forward`` answers and ``backward`` requests are wire bundles (:mod:`splitunet.wire`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitunet.config import SplitUNetConfig
from splitunet.data.grid import CaseGrid
from splitunet.data.sampling import Sample
from splitunet.schedules import LrSchedule, lr_factor

#: A run id: letters, digits, ``-`` and ``_`` (it names checkpoint folders).
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
#: Most samples in one forward request.
MAX_BATCH = 256
#: Step numbers are below this (the wire format's limit: 18 decimal digits).
STEP_LIMIT = 10**18


class Phase(StrEnum):
    TRAIN = "train"
    EVAL = "eval"


class WireDtypeName(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class StepSchedule(StrEnum):
    """How the aggregator orders the steps of a run (:mod:`splitunet.delayed`).

    ``sync``: each step's forward waits for the previous step's backward (exact split backpropagation).
    ``delayed``: the forward of step ``t + 1`` overlaps step ``t``'s decoder step and backward exchange, so every
    site update uses a gradient one step stale (PipeDream-style pipelining); a site keeps two steps in flight.
    """

    SYNC = "sync"
    DELAYED = "delayed"


class WireOptions(BaseModel):
    """Wire format of a run: dtype of activations and of gradients, optional zstd compression."""

    model_config = ConfigDict(extra="forbid")

    activations: WireDtypeName = WireDtypeName.FP16
    gradients: WireDtypeName = WireDtypeName.FP32
    compress: bool = False


class OptimizerOptions(BaseModel):
    """Adam settings of one party, and its learning-rate schedule (:mod:`splitunet.schedules`).

    ``total_steps`` is the run's length (the aggregator fills it in from the job's ``steps``); ``lr`` is the base
    rate the schedule multiplies.
    """

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=1e-4, gt=0, le=1.0)
    weight_decay: float = Field(default=1e-5, ge=0, le=1.0)
    schedule: LrSchedule = LrSchedule.CONSTANT
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_factor: float = Field(default=0.0, ge=0.0, le=1.0)
    total_steps: int | None = Field(default=None, ge=1, le=10_000_000)

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (constant when no ``total_steps`` is known)."""
        if self.schedule is LrSchedule.CONSTANT or self.total_steps is None:
            return self.lr
        return self.lr * lr_factor(
            self.schedule, step, self.total_steps, warmup_steps=self.warmup_steps, min_factor=self.min_lr_factor
        )


class SamplingPlan(BaseModel):
    """How the aggregator draws training batches: ``batch_size`` cases uniformly with replacement from
    ``population`` training cases per step (a site's DP accountant takes its sampling rate from this)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(ge=1, le=MAX_BATCH)
    population: int = Field(ge=1)

    def sample_rate(self, batch: int, cohort: int | None = None) -> float:
        """``P(a given case is in a batch of `batch` draws)`` = ``1 - (1 - 1/N)**batch``; ``N`` is capped by the
        ``cohort`` the site knows (a larger declared population would understate the rate)."""
        n = self.population if cohort is None else max(1, min(self.population, cohort))
        return 1.0 - (1.0 - 1.0 / n) ** max(batch, self.batch_size)


class RunSetup(BaseModel):
    """``POST /v1/runs``: build this site's encoder for a run.

    No seed: the site initialises its encoder from its own secret randomness (or its ``SITE_SEED``)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    model: SplitUNetConfig
    optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    wire: WireOptions = Field(default_factory=WireOptions)
    sampling: SamplingPlan | None = None
    step_schedule: StepSchedule = StepSchedule.SYNC


class RunInfo(BaseModel):
    """Answer to a run setup: the encoder this site built."""

    run_id: str
    site: str
    fingerprint: str
    parameters: int
    step: int = 0
    checkpoint_step: int | None = None
    restore_required: bool = False


class ForwardRequest(BaseModel):
    """``POST /v1/runs/{run_id}/forward``: encode these samples. Answer: an activation bundle."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0, lt=STEP_LIMIT)
    phase: Phase = Phase.TRAIN
    samples: list[Sample] = Field(min_length=1, max_length=MAX_BATCH)

    @field_validator("samples")
    @classmethod
    def _same_geometry(cls, value: list[Sample]) -> list[Sample]:
        sizes = {s.output_size for s in value}
        kinds = {s.axial_index is None for s in value}
        if len(sizes) != 1 or len(kinds) != 1:
            raise ValueError("all samples of one forward must have the same size and be all 2D or all 3D")
        return value


class BackwardAck(BaseModel):
    """Answer to ``POST /v1/runs/{run_id}/backward``: the step applied."""

    run_id: str
    step: int
    applied: bool = True
    defenses: list[dict[str, Any]] | None = Field(default=None, description="what each site defense did so far")


class CheckpointRequest(BaseModel):
    """``POST /v1/runs/{run_id}/checkpoint`` and ``.../restore``: save or load encoder + optimizer at a step."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0, lt=STEP_LIMIT)


class CheckpointInfo(BaseModel):
    run_id: str
    step: int
    path: str = Field(description="the checkpoint file's name (a basename: replies never show server paths)")
    sha256: str


class SiteInfo(BaseModel):
    """``GET /v1/info``: what a site offers. Never patient IDs."""

    site: str
    modalities: list[str]
    version: str
    device: str
    defenses: list[dict[str, Any]]
    defense_stats: list[dict[str, Any]] | None = Field(
        default=None, description="what each defense did so far (as in a backward ack; evaluation releases too)")
    runs: dict[str, RunInfo]
    model_policy: dict[str, Any] | None = None
    policy: dict[str, Any] | None = Field(default=None, description="the site's policy (services.client_site.policy)")
    leakage_gate: dict[str, Any] | None = Field(
        default=None, description="the site's own leakage gate: last decision and stops per run (figures only)")
    identity_key: str | None = Field(default=None, description="the site's Ed25519 public key (hex): it signs the "
                                     "site's transcript heads and secure-sum offers; pin it out of band")


class AlignedCases(BaseModel):
    """``POST /v1/alignment``: the aligned cohort (from the PSI); the site then serves only these cases."""

    model_config = ConfigDict(extra="forbid")

    case_ids: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1, max_length=1_000_000)
    session: str = Field(pattern=r"^[0-9a-f]{32}$", description="the PSI session this alignment comes from")


class AlignmentAck(BaseModel):
    aligned: int


class GridRequest(BaseModel):
    """``POST /v1/grids``: the header grid and brain extent of some aligned cases (see :mod:`splitunet.data.grid`)."""

    model_config = ConfigDict(extra="forbid")

    case_ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)


class CaseGrids(BaseModel):
    """Answer to ``POST /v1/grids``: one :class:`~splitunet.data.grid.CaseGrid` per case asked for."""

    grids: dict[str, CaseGrid]
