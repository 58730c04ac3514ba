"""Settings of the aggregator service: ``AGG_`` environment variables and mounted secret files."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.aggregator.privacy_gate import PrivacyGateSettings
from splitunet.data.layout import OnBadCase
from splitunet.registry import SiteRegistry
from splitunet.service.device import DeviceChoice
from splitunet.service.settings import ServiceSettings
from splitunet.signing import IdentityKey
from splitunet.transcript import TranscriptSettings
from splitunet.wire import DEFAULT_MAX_BYTES


class AggregatorSettings(ServiceSettings):
    """The aggregator's configuration.

    Args:
        data_dir: BraTS-layout folder of segmentations (``*_seg.nii.gz``); images are never here.
        state_dir: job checkpoints and inference outputs.
        device: ``cpu``, ``cuda`` or ``auto``.
        on_bad_case: ``raise`` or ``skip`` bad segmentation files.
        cache_cases: decoded label maps kept in memory.
        torch_threads: intra-op threads (``0``: torch's default).
        max_bundle_bytes: largest activation bundle accepted / gradient bundle produced.
        max_step_bytes: the memory bound of one training step or validation batch, in bytes (default 8 GiB):
            ``batch_size x roi`` voxels x the decoder's level-weighted channels x the measured bytes per
            voxel-channel, plus the decoder's weights and Adam state (:mod:`splitunet.memory`); a job spec above it
            is refused at ``POST /v1/jobs`` (413 ``over_memory_bound``). docs/limits.md.
        sites: the site registry file (``AGG_SITES``; YAML/JSON: name, URL, token file of every site a job may
            name; see :mod:`splitunet.registry`).
        site_ca_file: CA bundle to verify HTTPS site services (default: system CAs).
        site_client_cert_file, site_client_key_file: client certificate for mutual TLS to the sites.
        concurrency: threads calling sites concurrently (default: one per site).
        checkpoint_budget_bytes: most bytes of checkpoints under ``state_dir``; a job whose checkpoint would pass
            it fails with a clear error.
        site_wait_s: how long a job waits for an unreachable site before it fails (``waiting_for_site``).
        site_retry_max_s: longest pause between two probes of an unreachable site (the backoff doubles up to it).
        max_recoveries: roll-backs to a common checkpoint one job may do before it fails.
        transcript: the traffic transcript (``AGG_TRANSCRIPT__ENABLED``, ``__DIR``, ``__EVERY``, ...).
        identity_key_file: the aggregator's Ed25519 identity key (64 hex characters): it signs its transcript's
            chain heads. Default: ``state_dir/identity/ed25519.key``, created on first start.
        privacy_gate: the label-leakage gate every n steps (``AGG_PRIVACY_GATE__EVERY``, ``__MAX_LABEL_DICE``).
    """

    model_config = SettingsConfigDict(env_prefix="AGG_")

    port: int = Field(default=8100, ge=0, le=65535)
    data_dir: Path
    sites: Path
    state_dir: Path = Path("aggregator-state")
    device: DeviceChoice = DeviceChoice.AUTO
    on_bad_case: OnBadCase = OnBadCase.RAISE
    cache_cases: int = Field(default=256, ge=1)
    torch_threads: int = Field(default=0, ge=0)
    max_bundle_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)
    max_step_bytes: int = Field(default=8 * 2**30, ge=2**20)
    site_ca_file: Path | None = None
    site_client_cert_file: Path | None = None
    site_client_key_file: Path | None = None
    concurrency: int = Field(default=0, ge=0, le=64)
    checkpoint_budget_bytes: int = Field(default=16 * 2**30, gt=0)
    site_wait_s: float = Field(default=3600.0, gt=0)
    site_retry_max_s: float = Field(default=10.0, gt=0)
    max_recoveries: int = Field(default=100, ge=0)
    transcript: TranscriptSettings = Field(default_factory=TranscriptSettings)
    privacy_gate: PrivacyGateSettings = Field(default_factory=PrivacyGateSettings)
    identity_key_file: Path | None = None

    def identity(self) -> IdentityKey:
        """The aggregator's identity key (created in the state folder on first use when no file is configured)."""
        if self.identity_key_file is not None:
            return IdentityKey.load(self.identity_key_file)
        return IdentityKey.load_or_create(self.state_dir / "identity" / "ed25519.key")

    @model_validator(mode="after")
    def _check_sites(self) -> AggregatorSettings:
        for name in ("site_ca_file", "site_client_cert_file", "site_client_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {str(path)!r}")
        if (self.site_client_cert_file is None) != (self.site_client_key_file is None):
            raise ValueError("site_client_cert_file and site_client_key_file must be given together (or neither)")
        self.registry()  # a bad registry is a start-up error, not a failed job
        return self

    def registry(self) -> SiteRegistry:
        """The site registry, read now (:class:`ConfigurationError` if it is missing or malformed)."""
        tls = self.site_ca_file is not None or self.site_client_cert_file is not None
        return SiteRegistry.load(self.sites, tls_configured=tls)

    @model_validator(mode="after")
    def _gate_needs_transcript(self) -> AggregatorSettings:
        if self.privacy_gate.every and not self.transcript.enabled:
            raise ValueError("privacy_gate.every needs the transcript: set AGG_TRANSCRIPT__ENABLED=true")
        return self

    @field_validator("data_dir")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"data_dir {str(value)!r} is not a folder; point AGG_DATA_DIR at the segmentations")
        return value
