"""A service's site registry: the only sites an API caller may name, with their URLs and credentials.

The aggregator reads it from ``AGG_SITES`` (a job spec names sites by name only, ``"sites": ["t1", "t2"]``), the
audit service from ``AUDIT_SITES`` (an audit names the sites whose audit endpoints it calls). URLs and credential
files come from this file, which the operator of the service controls, so no API caller can make the service dial
an address of the caller's choosing or send a site's credential there (the *confused deputy*). The file is YAML
or JSON::

    sites:
      - name: t1
        url: https://site-t1.hospital-a.example:8101
        token_file: /run/secrets/site-t1-token     # this site's own token (scope "aggregator"); relative paths
      - name: t2                                   # are taken from the registry file's folder
        url: https://site-t2.hospital-b.example:8101
        token_file: site-t2-token

Every site has its own token: a token accepted by site A is refused by site B (the aggregator's are of scope
``aggregator``, the audit's of scope ``audit``). Token files are re-read for every job or audit (a rotation needs no
restart). A registry whose URL is ``http://`` while the service is configured with a CA or a client certificate
for the sites is a configuration error (the TLS settings would silently not apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from splitunet.errors import ConfigurationError, PolicyError
from splitunet.federation import SitePeer


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sites: list[SitePeer] = Field(min_length=1, max_length=64)

    @field_validator("sites")
    @classmethod
    def _unique(cls, value: list[SitePeer]) -> list[SitePeer]:
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return value


class SiteRegistry:
    """The sites a service may call, by name.

    Args:
        peers: the registry's sites.
        tls_configured: the service has a CA or client certificate for the sites (then ``http://`` is refused).
        setting: the setting that names the registry file (for messages), e.g. ``AGG_SITES``.

    Raises:
        ConfigurationError: a missing token file, or ``http://`` with TLS configured.
    """

    def __init__(self, peers: Sequence[SitePeer], *, tls_configured: bool = False, setting: str = "AGG_SITES") -> None:
        self.setting = setting
        for peer in peers:
            if not peer.token_file.is_file():
                raise ConfigurationError(f"site registry: the token file of site {peer.name!r} does not exist")
            if tls_configured and peer.url.lower().startswith("http://"):
                raise ConfigurationError(
                    f"site registry: site {peer.name!r} has an http:// URL but a CA or a client certificate for the "
                    "sites is configured; use https:// (TLS would silently not apply)"
                )
        self._peers = {p.name: p for p in peers}

    @classmethod
    def load(cls, path: Path, *, tls_configured: bool = False, setting: str = "AGG_SITES") -> SiteRegistry:
        """Read a registry file (YAML or JSON); :class:`ConfigurationError` saying what is wrong."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read the site registry {setting}={str(path)!r}: {exc}") from None
        try:
            parsed = RegistryFile.model_validate(doc)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"bad site registry {str(path)!r}: {problems}") from None
        peers = [
            p if p.token_file.is_absolute() else p.model_copy(update={"token_file": path.parent / p.token_file})
            for p in parsed.sites
        ]
        return cls(peers, tls_configured=tls_configured, setting=setting)

    @property
    def names(self) -> list[str]:
        return list(self._peers)

    def resolve(self, names: Sequence[str]) -> list[SitePeer]:
        """The registry entries of ``names``; 403 ``policy_violation`` naming the unknown ones."""
        unknown = [n for n in names if n not in self._peers]
        if unknown:
            raise PolicyError(
                f"site(s) {unknown} are not in this service's site registry ({self.setting}); name only the "
                f"registered sites {self.names}",
                detail={"rule": "site_registry", "unknown": unknown, "registered": self.names},
            )
        return [self._peers[n] for n in names]
