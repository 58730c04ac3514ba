"""The federation spec a user posts to the aggregator (``POST /v1/jobs``), and the job status it reports.

The spec names the sites (URL and credential) and the training run; the sites' modalities come from the sites
themselves (``GET /v1/info``), so the model's ``sites`` are filled in by the aggregator in the spec's order.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from splitunet.config import Fusion, SiteSpec, SkipPolicy, SplitUNetConfig
from splitunet.losses import LossKind
from splitunet.schemas import RUN_ID_PATTERN, OptimizerOptions, WireOptions


class SitePeer(BaseModel):
    """One site service: its name (as in the model), base URL and bearer token (direct or from a file)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$")
    url: str = Field(pattern=r"^https?://")
    token: SecretStr | None = None
    token_file: Path | None = None

    def bearer(self) -> str | None:
        """The token to send, read from ``token_file`` if given (first non-comment line)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            from splitunet.service.settings import read_secret_file

            tokens = read_secret_file(self.token_file)
            return tokens[0] if tokens else None
        return None


class ModelSpec(BaseModel):
    """The architecture of a job, without the sites (they are taken from the site services)."""

    model_config = ConfigDict(extra="forbid")

    spatial_dims: int = 2
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    cut_level: int = 0
    skips: SkipPolicy | tuple[int, ...] | str = SkipPolicy.ALL
    fusion: Fusion = Fusion.CONCAT
    dropout: float = 0.0

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelSpec:
        # Everything but the sites can be checked now (with placeholder sites), so a bad cut level or skip list
        # is a 422 on POST /v1/jobs rather than a job that fails after contacting the sites.
        try:
            SplitUNetConfig.model_validate(self.model_dump())
        except ValidationError as exc:
            raise ValueError("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())) from None
        return self

    def build(self, sites: tuple[SiteSpec, ...]) -> SplitUNetConfig:
        """The full configuration with ``sites`` (validated; raises ``ValueError`` naming a bad parameter)."""
        return SplitUNetConfig.model_validate({**self.model_dump(), "sites": [s.model_dump() for s in sites]})


class FederationSpec(BaseModel):
    """Everything a training job needs.

    Args:
        sites: the site services, in the order their tensors are fused.
        model: architecture (cut level, skip policy, fusion, 2D/3D, widths).
        roi: input size per sample: 2 ints (2D, in-plane) or 3 ints (3D patch), multiples of ``2**(depth-1)``.
        resize_slices: 2D only: take whole axial slices resized to ``roi`` (bilinear for images, nearest for
            labels; predictions are resized back) instead of cropping ``roi`` out of them.
        batch_size: samples per step.
        steps: training steps.
        loss: ``dice`` (the BraTS recipe), ``dice_batch`` or ``dice_ce`` (see :mod:`splitunet.losses`).
        site_optimizer, server_optimizer: Adam settings of the encoders and of the decoder.
        val_interval: validate every N steps (0: only at the end).
        val_cases: held-out cases: a number (taken from the aligned cases by ``seed``) or an explicit list.
        max_val_cases: cap on validation cases per validation (0: no cap).
        fg_ratio: probability that a sample is centred on tumour (foreground-weighted sampling).
        flip_prob: probability of a random flip per spatial axis.
        seed: initialisation and sampling seed.
        wire: wire dtypes and compression.
        checkpoint_interval: checkpoint every N steps (0: only at the end).
        timeout_s: read timeout of one call to a site.
    """

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)
    sites: list[SitePeer] = Field(min_length=1, max_length=16)
    model: ModelSpec = Field(default_factory=ModelSpec)
    roi: tuple[int, ...] = (128, 128)
    resize_slices: bool = False
    batch_size: int = Field(default=4, ge=1, le=256)
    steps: int = Field(default=100, ge=1, le=10_000_000)
    loss: LossKind = LossKind.DICE
    site_optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    server_optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    val_interval: int = Field(default=0, ge=0)
    val_cases: int | list[str] = 2
    max_val_cases: int = Field(default=0, ge=0)
    fg_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, lt=2**31)
    wire: WireOptions = Field(default_factory=WireOptions)
    checkpoint_interval: int = Field(default=0, ge=0)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)

    @field_validator("sites")
    @classmethod
    def _unique(cls, value: list[SitePeer]) -> list[SitePeer]:
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return value

    @field_validator("val_cases")
    @classmethod
    def _val(cls, value: int | list[str]) -> int | list[str]:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"val_cases must be >= 1 or a list of case ids, got {value}")
        return value

    @model_validator(mode="after")
    def _roi(self) -> FederationSpec:
        if len(self.roi) != self.model.spatial_dims:
            raise ValueError(
                f"roi has {len(self.roi)} sizes but model.spatial_dims is {self.model.spatial_dims}; "
                f"give {self.model.spatial_dims} sizes"
            )
        if self.resize_slices and self.model.spatial_dims != 2:
            raise ValueError("resize_slices is for 2D models (spatial_dims=2) only")
        multiple = 2 ** (len(self.model.features) - 1)
        if any(r % multiple or r < 2 * multiple for r in self.roi):
            raise ValueError(f"roi sizes must be multiples of {multiple} and >= {2 * multiple}, got {list(self.roi)}")
        return self


class JobState(StrEnum):
    PENDING = "pending"
    ALIGNING = "aligning"
    RUNNING = "running"
    STOPPING = "stopping"
    PAUSED_BY_PRIVACY_GATE = "paused_by_privacy_gate"
    STOPPED = "stopped"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobStatus(BaseModel):
    """``GET /v1/jobs/{id}``: where a job is."""

    job_id: str
    state: JobState
    step: int = 0
    steps: int
    loss: float | None = None
    losses: list[float] = Field(default_factory=list, description="loss of every step (the last 100 000)")
    steps_per_second: float | None = None
    samples_per_second: float | None = None
    aligned_cases: int | None = None
    train_cases: int | None = None
    val_cases: int | None = None
    val_case_ids: list[str] = Field(default_factory=list)
    validation: dict[str, Any] | None = None
    validation_step: int | None = None
    validations: list[dict[str, Any]] = Field(default_factory=list)
    checkpoint_step: int | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    error: dict[str, Any] | None = None
    timing: dict[str, float] = Field(default_factory=dict)
    privacy_gate: dict[str, Any] | None = Field(default=None, description="the last privacy-gate decision")


class JobCreated(BaseModel):
    job_id: str
    state: JobState


class AggregatorInfo(BaseModel):
    """``GET /v1/info`` of the aggregator."""

    service: str = "aggregator"
    version: str
    device: str
    labelled_cases: int
    skipped_cases: int


class InferRequest(BaseModel):
    """``POST /v1/infer``: segment one aligned case through the sites' encoders."""

    model_config = ConfigDict(extra="forbid")

    case_id: str = Field(min_length=1, max_length=256)
    job_id: str | None = None
