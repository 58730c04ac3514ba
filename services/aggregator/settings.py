"""Settings of the aggregator service: ``AGG_`` environment variables and mounted secret files."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from splitunet.data.layout import OnBadCase
from splitunet.service.device import DeviceChoice
from splitunet.service.settings import ServiceSettings
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
        site_ca_file: CA bundle to verify HTTPS site services (default: system CAs).
        site_client_cert_file, site_client_key_file: client certificate for mutual TLS to the sites.
        concurrency: threads calling sites concurrently (default: one per site).
        site_wait_s: how long a job waits for an unreachable site before it fails (``waiting_for_site``).
        site_retry_max_s: longest pause between two probes of an unreachable site (the backoff doubles up to it).
        max_recoveries: roll-backs to a common checkpoint one job may do before it fails.
    """

    model_config = SettingsConfigDict(env_prefix="AGG_")

    port: int = Field(default=8100, ge=0, le=65535)
    data_dir: Path
    state_dir: Path = Path("aggregator-state")
    device: DeviceChoice = DeviceChoice.AUTO
    on_bad_case: OnBadCase = OnBadCase.RAISE
    cache_cases: int = Field(default=256, ge=1)
    torch_threads: int = Field(default=0, ge=0)
    max_bundle_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)
    site_ca_file: Path | None = None
    site_client_cert_file: Path | None = None
    site_client_key_file: Path | None = None
    concurrency: int = Field(default=0, ge=0, le=64)
    site_wait_s: float = Field(default=3600.0, gt=0)
    site_retry_max_s: float = Field(default=10.0, gt=0)
    max_recoveries: int = Field(default=100, ge=0)

    @field_validator("data_dir")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"data_dir {str(value)!r} is not a folder; point AGG_DATA_DIR at the segmentations")
        return value
