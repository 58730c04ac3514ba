"""Connection profiles: where the services are and how to authenticate, as ``kubectl`` contexts work.

A profile file (TOML; default ``$XDG_CONFIG_HOME/splitunet/profiles.toml``, i.e.
``~/.config/splitunet/profiles.toml``; ``SPLITUNET_PROFILES`` names another) holds named profiles and which one is
the default::

    default = "hospital-net"

    [profiles.hospital-net]
    url = "https://aggregator.example.org:8443"          # the aggregator's job API
    audit_url = "https://audit.example.org:8443"         # the audit service
    token_file = "~/.config/splitunet/operator-token"    # the operator token (scope operator)
    # audit_token_file = "..."                           # default: token_file
    ca_file = "~/.config/splitunet/federation-ca.pem"    # trust this CA (default: the system's)
    client_cert = "~/.config/splitunet/operator.pem"     # mutual TLS, with client_key
    client_key = "~/.config/splitunet/operator-key.pem"
    timeout_s = 60

Each setting is taken from, in order: the command line (or the ``Federation`` argument), the environment
(``SPLITUNET_URL``, ``SPLITUNET_AUDIT_URL``, ``SPLITUNET_TOKEN_FILE``, ``SPLITUNET_AUDIT_TOKEN_FILE``,
``SPLITUNET_CA_FILE``, ``SPLITUNET_CLIENT_CERT``, ``SPLITUNET_CLIENT_KEY``, ``SPLITUNET_TIMEOUT_S``), the profile
(``--profile`` / ``SPLITUNET_PROFILE``, else the file's ``default``), else nothing. A relative path in a profile is
relative to the profile file's folder. Tokens are never read from the command line or the profile itself: only from
files.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitunet.errors import ConfigurationError

#: Environment variable naming the profile file (tests point it at their own).
PROFILES_ENV = "SPLITUNET_PROFILES"
#: Environment variable naming the profile to use.
PROFILE_ENV = "SPLITUNET_PROFILE"
#: Environment variable of each connection setting.
ENV_VARS: dict[str, str] = {
    "url": "SPLITUNET_URL",
    "audit_url": "SPLITUNET_AUDIT_URL",
    "token_file": "SPLITUNET_TOKEN_FILE",
    "audit_token_file": "SPLITUNET_AUDIT_TOKEN_FILE",
    "ca_file": "SPLITUNET_CA_FILE",
    "client_cert": "SPLITUNET_CLIENT_CERT",
    "client_key": "SPLITUNET_CLIENT_KEY",
    "timeout_s": "SPLITUNET_TIMEOUT_S",
}
_URL = r"^https?://[^\s]+$"
_PATH_FIELDS = ("token_file", "audit_token_file", "ca_file", "client_cert", "client_key")


class Profile(BaseModel):
    """Where the services are and how to reach them. Paths may start with ``~``."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, pattern=_URL, description="the aggregator's base URL")
    audit_url: str | None = Field(default=None, pattern=_URL, description="the audit service's base URL")
    token_file: Path | None = Field(default=None, description="file holding the operator token")
    audit_token_file: Path | None = Field(default=None, description="the audit service's token (default: token_file)")
    ca_file: Path | None = Field(default=None, description="CA bundle that signed the services' certificates")
    client_cert: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    client_key: Path | None = Field(default=None, description="its private key")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="read timeout of one call, seconds")


def profiles_path(environ: Mapping[str, str] | None = None) -> Path:
    """The profile file: ``$SPLITUNET_PROFILES``, else ``$XDG_CONFIG_HOME/splitunet/profiles.toml`` (default
    ``~/.config``)."""
    environ = os.environ if environ is None else environ
    if environ.get(PROFILES_ENV):
        return Path(environ[PROFILES_ENV]).expanduser()
    config = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "splitunet" / "profiles.toml"


def load_profile(name: str | None = None, path: Path | None = None) -> Profile:
    """Profile ``name`` of the file at ``path`` (default :func:`profiles_path`); with no ``name``, the file's
    ``default`` (an empty profile when the file does not exist or names no default)."""
    path = profiles_path() if path is None else path
    if not path.is_file():
        if name is not None:
            raise ConfigurationError(f"profile {name!r} asked for, but there is no profile file {str(path)!r}")
        return Profile()
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read the profile file {str(path)!r}: {exc}") from None
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigurationError(f"{str(path)!r}: 'profiles' must be a table of [profiles.NAME] tables")
    name = name or document.get("default")
    if name is None:
        return Profile()
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigurationError(f"no profile {name!r} in {str(path)!r}; it has: {known}")
    try:
        profile = Profile.model_validate(profiles[name])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"profile {name!r} in {str(path)!r}: {problems}") from None
    # as kubectl does with a kubeconfig's files: a relative path is relative to the profile file's folder
    files = {field: path.parent / value for field in _PATH_FIELDS
             if (value := getattr(profile, field)) is not None and not value.is_absolute()
             and not str(value).startswith("~")}
    return profile.model_copy(update=files)


def resolve_profile(
    overrides: Mapping[str, Any] | None = None, *, profile: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Profile:
    """The settings in force: ``overrides`` (``None`` values ignored) over the environment over the profile."""
    environ = os.environ if environ is None else environ
    base = load_profile(profile or environ.get(PROFILE_ENV) or None, profiles_path(environ))
    values: dict[str, Any] = base.model_dump(exclude_unset=True)
    values |= {field: environ[var] for field, var in ENV_VARS.items() if environ.get(var)}
    values |= {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Profile.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"bad connection settings: {problems}") from None
