"""Settings of the audit service: ``AUDIT_`` environment variables and mounted secret files."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from splitunet.service.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    """The audit service's configuration.

    Args:
        transcripts_dir: the aggregator's transcript folder (``AGG_TRANSCRIPT__DIR``, mounted read-only); an audit
            names a run inside it, never a path.
        lab_images_dir, lab_labels_dir: lab mode only (phantom, tests): the cohort read directly.
        public_cases: size of the public auxiliary phantom cohort (prior, learned attack, baselines).
        max_audits: finished audits kept in memory (oldest dropped).
        torch_threads: intra-op threads (``0``: torch's default).
        site_timeout_s: read timeout of calls to the sites' audit endpoints.
    """

    model_config = SettingsConfigDict(env_prefix="AUDIT_")

    port: int = Field(default=8300, ge=0, le=65535)
    transcripts_dir: Path
    lab_images_dir: Path | None = None
    lab_labels_dir: Path | None = None
    public_cases: int = Field(default=16, ge=2)
    max_audits: int = Field(default=32, ge=1)
    torch_threads: int = Field(default=0, ge=0)
    site_timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("transcripts_dir")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"transcripts_dir {str(value)!r} is not a folder; point AUDIT_TRANSCRIPTS_DIR at the "
                             "aggregator's transcripts (AGG_TRANSCRIPT__DIR)")
        return value
