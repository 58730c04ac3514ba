"""Settings of the audit service: ``AUDIT_`` environment variables and mounted secret files."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from splitunet.errors import PolicyError
from splitunet.federation import SiteName
from splitunet.registry import SiteRegistry
from splitunet.schemas import RUN_ID_PATTERN
from splitunet.service.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    """The audit service's configuration.

    Args:
        transcripts_dir: the aggregator's transcript folder (``AGG_TRANSCRIPT__DIR``, mounted read-only); an audit
            names a run inside it, never a path.
        labels_dir: the aggregator's segmentations (``AGG_DATA_DIR``, mounted read-only: this service runs beside
            the aggregator), for the aggregator's own label-leakage audit of the gradients it sent.
        lab_images_dir, lab_labels_dir: lab mode only (phantom, tests): the cohort read directly.
        lab_snapshots: lab mode only: ``{site: SITE_STATE_DIR}`` (JSON), the sites' encoder snapshots for the
            white-box attack (one operator holds everything in a lab).
        public_cases: size of the public auxiliary phantom cohort (prior, learned attack, baselines).
        max_audits: finished audits kept in memory (oldest dropped).
        torch_threads: intra-op threads (``0``: torch's default).
        site_timeout_s: read timeout of calls to the sites' audit endpoints.
        sites: the audit's site registry (``AUDIT_SITES``, YAML/JSON: name, URL and this audit's token file at every
            site an audit may name, one token per site; see :mod:`splitunet.registry`). None: lab audits only.
        site_ca_file: CA bundle to verify HTTPS sites; site_client_cert_file, site_client_key_file: the audit's
            client certificate for mutual TLS to the sites.
    """

    model_config = SettingsConfigDict(env_prefix="AUDIT_")

    port: int = Field(default=8300, ge=0, le=65535)
    transcripts_dir: Path
    lab_images_dir: Path | None = None
    lab_labels_dir: Path | None = None
    labels_dir: Path | None = None
    lab_snapshots: dict[str, Path] = Field(default_factory=dict)
    public_cases: int = Field(default=16, ge=2)
    max_audits: int = Field(default=32, ge=1)
    torch_threads: int = Field(default=0, ge=0)
    site_timeout_s: float = Field(default=120.0, gt=0)
    sites: Path | None = None
    site_ca_file: Path | None = None
    site_client_cert_file: Path | None = None
    site_client_key_file: Path | None = None

    @model_validator(mode="after")
    def _check_sites(self) -> AuditSettings:
        for name in ("site_ca_file", "site_client_cert_file", "site_client_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {str(path)!r}")
        if (self.site_client_cert_file is None) != (self.site_client_key_file is None):
            raise ValueError("site_client_cert_file and site_client_key_file must be given together (or neither)")
        if self.sites is not None:
            self.registry()  # a bad registry is a start-up error, not a failed audit
        return self

    def registry(self) -> SiteRegistry:
        """The site registry, read now; 403 for an audit naming sites when none is configured."""
        if self.sites is None:
            raise PolicyError(
                "this audit service has no site registry (AUDIT_SITES): only lab audits, naming no site, can run",
                detail={"rule": "site_registry"},
            )
        tls = self.site_ca_file is not None or self.site_client_cert_file is not None
        return SiteRegistry.load(self.sites, tls_configured=tls, setting="AUDIT_SITES")

    def site_verify(self) -> ssl.SSLContext | bool:
        """TLS verification of the calls to the sites: the CA and the client certificate, when configured."""
        if self.site_ca_file is None and self.site_client_cert_file is None:
            return True
        from splitunet.service.client import tls_context

        return tls_context(ca_file=self.site_ca_file, cert_file=self.site_client_cert_file,
                           key_file=self.site_client_key_file)

    @field_validator("transcripts_dir")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        # The aggregator creates the folder with its first transcript: the audit may start before it, but the
        # volume it lives on must be there (a missing mount is a configuration error).
        if not value.is_dir() and not value.parent.is_dir():
            raise ValueError(f"transcripts_dir {str(value)!r} is not a folder (nor is its parent); point "
                             "AUDIT_TRANSCRIPTS_DIR at the aggregator's transcripts (AGG_TRANSCRIPT__DIR)")
        return value


class AuditJobSettings(AuditSettings):
    """A one-off audit (``splitunet audit once``, the Kubernetes Job form): the service's settings plus the
    request, so the Job reads the same ``AUDIT_*`` ConfigMap and credentials as the service.

    Args:
        run_id: the run to audit (``AUDIT_RUN_ID``); unset or empty: the run whose transcript was written last.
        run_sites: the sites to ask for their own audits' figures (``AUDIT_RUN_SITES``, comma-separated names of
            ``AUDIT_SITES``); unset or empty: every site of the run that the registry holds.
        run_spec: what to attack (``AUDIT_RUN_SPEC``, JSON of :class:`~splitunet.auditing.runner.AuditSpec`
            fields, e.g. ``{"steps": [3], "attacks": ["whitebox"]}``); empty: the spec's defaults.
        reports_dir: where ``<run_id>/<audit_id>/result.json`` and ``report.html`` are written
            (``AUDIT_REPORTS_DIR``; a writable volume in the Job).
    """

    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)
    run_sites: Annotated[list[SiteName], NoDecode] = Field(default_factory=list, max_length=64)
    run_spec: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    reports_dir: Path

    @field_validator("run_id", mode="before")
    @classmethod
    def _empty_is_newest(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("run_sites", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("run_spec", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"AUDIT_RUN_SPEC is not JSON ({exc}); e.g. {{\"steps\": [3]}}") from None
        return value
