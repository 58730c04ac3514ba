"""The federation spec a user posts to the aggregator (``POST /v1/jobs``), and the job status it reports.

The spec names the sites by **name only** (entries of the aggregator's own site registry, ``AGG_SITES``: see
:mod:`splitunet.registry`) and the training run; the sites' modalities come from the sites themselves
(``GET /v1/info``), so the model's ``sites`` are filled in by the aggregator in the spec's order.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from splitunet.config import Fusion, SiteSpec, SkipPolicy, SplitUNetConfig
from splitunet.defenses.config import GradientDefenseConfig
from splitunet.inference import DEFAULT_OVERLAP
from splitunet.losses import DEFAULT_LOSS, LossKind
from splitunet.schemas import RUN_ID_PATTERN, OptimizerOptions, StepSchedule, WireDtypeName, WireOptions
from splitunet.secure_sum import SecureSumOptions

SITE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$"
SiteName = Annotated[str, Field(min_length=1, max_length=63, pattern=SITE_NAME_PATTERN)]


class SitePeer(BaseModel):
    """One entry of the aggregator's site registry: name (as in the model), base URL, this site's token file."""

    model_config = ConfigDict(extra="forbid")

    name: SiteName
    url: str = Field(pattern=r"^https?://[^\s]+$")
    token_file: Path

    def bearer(self) -> str:
        """The token to send to this site (the file's first token, read now: rotation needs no restart)."""
        from splitunet.service.settings import read_secret_file

        return read_secret_file(self.token_file)[0]


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


class MissingSitePolicy(StrEnum):
    """What a job does when a site stops answering: ``wait`` for it (every party rolls back to the latest common
    checkpoint once it is back), or ``continue`` with the others (the site is re-admitted when it answers again)."""

    WAIT = "wait"
    CONTINUE = "continue"


class FederationSpec(BaseModel):
    """Everything a training job needs.

    Args:
        sites: names of sites of the aggregator's registry (``AGG_SITES``), in the order their tensors are
            fused; never URLs or credentials.
        model: architecture (cut level, skip policy, fusion, 2D/3D, widths).
        roi: input size per sample: 2 ints (2D, in-plane) or 3 ints (3D patch), multiples of ``2**(depth-1)``.
        resize_slices: 2D only: take whole axial slices resized to ``roi`` (bilinear for images, nearest for
            labels; predictions are resized back) instead of cropping ``roi`` out of them.
        batch_size: samples per step.
        steps: training steps.
        loss: ``dice_ce`` (default: batch Dice + per-channel BCE), ``dice_focal``, ``dice_batch`` or ``dice`` (see
            :mod:`splitunet.losses`).
        site_optimizer, server_optimizer: Adam settings and learning-rate schedule of the encoders and of the
            decoder (``total_steps`` is filled in from ``steps``).
        val_interval: validate every N steps (0: only at the end).
        val_cases: held-out cases: a number (taken from the aligned cases by ``seed``) or an explicit list.
        max_val_cases: cap on validation cases per validation (0: no cap).
        infer_cases: cases without a label file to align too, so that ``/v1/infer`` can segment them (e.g. BraTS
            validation data); they are never trained or validated on.
        sw_overlap: sliding-window overlap of validation and inference (MONAI's BraTS setting 0.5).
        fg_ratio: probability that a sample is centred on tumour (foreground-weighted sampling).
        flip_prob: probability of a random flip per spatial axis.
        seed: initialisation and sampling seed.
        wire: wire dtypes and compression.
        checkpoint_interval: checkpoint every N steps (0: only at the end).
        timeout_s: read timeout of one call to a site.
        gradient_defenses: the aggregator's defenses on the gradients it returns, in order (label protection;
            see :mod:`splitunet.defenses`).
        secure_sum: mask the sites' tensors pairwise so the aggregator sees only their sum (needs
            ``model.fusion = sum`` and fp32 activations on the wire; see :mod:`splitunet.secure_sum`).
        step_schedule: ``sync`` (default, exact) or ``delayed``: the sites' forward of step ``t + 1`` overlaps
            step ``t``'s decoder step and gradients, so site updates use one-step-stale gradients (see
            :mod:`splitunet.delayed`); the pipeline drains before validation, checkpoints and the privacy gate.
        site_dropout: training for absence: each site is left out of a step with this probability (never all of
            them; every site takes part in a step that checkpoints); a site left out is not asked to forward and
            gets no gradient (see :mod:`services.aggregator.attendance`).
        missing_site_policy: ``wait`` (default): a site that stops answering pauses the job until it is back, then
            every party rolls back to the latest common checkpoint; ``continue``: the job goes on with the other
            sites and re-admits the site (restored to its latest checkpoint) when it answers again.
    """

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)
    sites: list[SiteName] = Field(min_length=1, max_length=16)
    model: ModelSpec = Field(default_factory=ModelSpec)
    roi: tuple[int, ...] = (128, 128)
    resize_slices: bool = False
    batch_size: int = Field(default=4, ge=1, le=256)
    steps: int = Field(default=100, ge=1, le=10_000_000)
    loss: LossKind = DEFAULT_LOSS
    site_optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    server_optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    val_interval: int = Field(default=0, ge=0)
    val_cases: int | list[str] = 2
    max_val_cases: int = Field(default=0, ge=0)
    infer_cases: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=100_000
    )
    sw_overlap: float = Field(default=DEFAULT_OVERLAP, ge=0.0, lt=1.0)
    fg_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, lt=2**31)
    wire: WireOptions = Field(default_factory=WireOptions)
    checkpoint_interval: int = Field(default=0, ge=0)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    gradient_defenses: list[GradientDefenseConfig] = Field(default_factory=list, max_length=16)
    secure_sum: SecureSumOptions | None = None
    step_schedule: StepSchedule = StepSchedule.SYNC
    site_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    missing_site_policy: MissingSitePolicy = MissingSitePolicy.WAIT

    @field_validator("sites", mode="before")
    @classmethod
    def _names_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(not isinstance(v, str) for v in value):
            raise ValueError(
                "sites are names from the aggregator's site registry (AGG_SITES), e.g. [\"t1\", \"t2\"]; a job "
                "may not carry site URLs or credentials"
            )
        return value

    @field_validator("sites")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        names = list(value)
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
        if self.secure_sum is not None:
            if self.model.fusion != Fusion.SUM:
                raise ValueError(f"secure_sum needs model.fusion='sum', got {self.model.fusion.value!r}")
            if self.wire.activations != WireDtypeName.FP32:
                raise ValueError("secure_sum needs wire.activations='fp32' (masked fixed-point values are exact there)")
            if len(self.sites) < 2:
                raise ValueError("secure_sum needs at least 2 sites")
        self._check_absence()
        return self

    def _check_absence(self) -> None:
        absence = self.site_dropout > 0 or self.missing_site_policy == MissingSitePolicy.CONTINUE
        if not absence:
            return
        what = "site_dropout > 0" if self.site_dropout > 0 else "missing_site_policy='continue'"
        if self.secure_sum is not None:
            raise ValueError(
                f"secure_sum cannot train with {what}: its pairwise masks cancel only over the full set of sites, "
                "and re-agreeing them for a smaller set is not implemented; use missing_site_policy='wait' and "
                "site_dropout=0 with secure_sum"
            )
        if self.step_schedule == StepSchedule.DELAYED:
            raise ValueError(f"{what} needs step_schedule='sync' (the delayed schedule assumes every site in "
                             "every step)")
        if len(self.sites) < 2:
            raise ValueError(f"{what} needs at least 2 sites (a step never leaves out every site)")

    @property
    def trains_for_absence(self) -> bool:
        """Whether the model is trained with sites absent (site dropout, or continuing without a site)."""
        return self.site_dropout > 0 or self.missing_site_policy == MissingSitePolicy.CONTINUE


class JobState(StrEnum):
    """Where a job is. ``waiting_for_site``: a site does not answer (``JobStatus.waiting_for`` names it), the job
    polls it with bounded backoff; ``resuming``: every party is being rolled back to the latest step all of them
    checkpointed (after a site came back, or after the aggregator restarted)."""

    PENDING = "pending"
    ALIGNING = "aligning"
    RUNNING = "running"
    WAITING_FOR_SITE = "waiting_for_site"
    RESUMING = "resuming"
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
    unlabeled_cases: int | None = Field(default=None, description="aligned cases without labels (inference only)")
    validation: dict[str, Any] | None = Field(
        default=None,
        description="last validation: mean Dice/HD95 (mm) per region, their medians and the per-case figures",
    )
    validation_step: int | None = None
    validations: list[dict[str, Any]] = Field(default_factory=list)
    checkpoint_step: int | None = None
    waiting_for: list[str] = Field(default_factory=list, description="sites not answering (waiting_for_site)")
    recoveries: int = Field(default=0, description="roll-backs to a common checkpoint after a fault")
    resumed_from_step: int | None = Field(default=None, description="step of the last roll-back")
    checkpoint_errors: list[str] = Field(default_factory=list, description="checkpoints found corrupt and skipped")
    bytes_sent: int = 0
    bytes_received: int = 0
    error: dict[str, Any] | None = None
    timing: dict[str, float] = Field(default_factory=dict)
    step_times: list[dict[str, float]] = Field(
        default_factory=list,
        description="wall seconds of the last 1000 training steps: step, total and per phase (plan: sampling and "
        "labels; forward: the sites' forward calls, concurrent; aggregator: decoder step; backward: gradient sends)",
    )
    defenses: dict[str, Any] = Field(
        default_factory=dict,
        description="what the defenses did: {'gradients': [aggregator's], 'sites': {site: [site's]}, 'secure_sum'}",
    )
    privacy_gate: dict[str, Any] | None = Field(default=None, description="the last privacy-gate decision")
    model_card: dict[str, Any] = Field(
        default_factory=dict,
        description="what the model was trained for: its sites, fusion and absence handling, the site dropout "
        "rate and the site subsets it was trained on (with how many steps each)",
    )
    attendance: dict[str, Any] = Field(
        default_factory=dict,
        description="missing_site_policy 'continue': sites offline now, and per site the steps it missed "
        "(ranges [first, last] its encoder reflects none of) and when it was re-admitted",
    )


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
    sites: list[SiteName] | None = Field(
        default=None, min_length=1, max_length=16,
        description="the sites to segment with (default: every site of the job); a site that does not answer "
        "within the job's timeout_s is left out too; the response's X-Sites-Used header names the sites used",
    )


class ValidateRequest(BaseModel):
    """``POST /v1/jobs/{id}/validate``: validate a job's model on its validation cases with a subset of sites."""

    model_config = ConfigDict(extra="forbid")

    sites: list[SiteName] | None = Field(default=None, min_length=1, max_length=16)
