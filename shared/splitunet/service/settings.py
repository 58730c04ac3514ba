"""Settings common to the three services (site, aggregator, audit).

Each service subclasses :class:`ServiceSettings` and sets its own prefix, e.g.::

    class SiteSettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="SITE_")   # merged with the base config below
        site_id: str

so ``SITE_PORT=9001``, ``SITE_AUTH_TOKEN_FILE=/run/secrets/site-token`` and nested fields as
``SITE_MODEL__CUT_LEVEL=2`` configure it. Tests construct ``SiteSettings(...)`` directly; there is no global
settings object.

Secrets reach a service in one of three ways: directly (``auth_token``; fine for tests), as a file named by
``auth_token_file`` (one token per line, ``#`` comments allowed: how Kubernetes mounts a Secret), or through
pydantic-settings' ``secrets_dir`` (``Settings(_secrets_dir="/run/secrets")`` reads the file
``/run/secrets/<env_prefix>auth_token``). Several tokens may be accepted at once, for rotation.

Auth is never off by accident: with no token configured, construction fails unless ``auth_disabled=True``.

Credential scopes (:mod:`splitunet.service.scopes`): ``auth_token*`` configure the service's
:attr:`ServiceSettings.primary_scope` (a site's ``aggregator``, the aggregator's ``operator``); another scope's
tokens come from their own file, ``<PREFIX>SCOPE_TOKEN_FILES__AUDIT=/run/secrets/audit-token``. One token may
not serve two scopes.

TLS cannot be silently off: when ``tls_cert_file``/``tls_key_file`` are set, :func:`splitunet.service.app.
create_service_app` refuses to build the app unless the process was started by ``splitunet serve`` (which
hands the files to uvicorn), and plain-HTTP requests reaching such an app are refused.
"""

from __future__ import annotations

import copy
import json
import ssl
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from splitunet.service.scopes import Scope

#: Default limit of a request body: a batch of 3D fp32 gradients for every level fits with room to spare.
DEFAULT_MAX_REQUEST_BYTES = 512 * 2**20
#: Limit of a JSON request body (every JSON endpoint; tensor endpoints declare their own limit).
DEFAULT_MAX_JSON_BYTES = 2**20
#: Set by ``splitunet serve`` once it has handed the TLS files to uvicorn (see ``create_service_app``).
TLS_SERVER_ENV = "SPLITUNET_TLS_SERVER"


class LogLevel(StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"
    TRACE = "trace"


class ClientAuth(StrEnum):
    """Whether the server asks clients for a TLS certificate (mutual TLS); maps to ``ssl.CERT_*``."""

    NONE = "none"
    REQUIRED = "required"

    def cert_reqs(self) -> int:
        return ssl.CERT_REQUIRED if self is ClientAuth.REQUIRED else ssl.CERT_NONE


def read_secret_file(path: str | Path) -> list[str]:
    """Read secrets from a file: one per line, surrounding whitespace stripped, blank and ``#`` lines skipped.

    Raises ``ValueError`` naming the file when it cannot be read or holds no secret.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read secret file {str(path)!r}: {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    secrets = [line for line in lines if line and not line.startswith("#")]
    if not secrets:
        raise ValueError(f"secret file {str(path)!r} holds no secret (one per line expected)")
    return secrets


def _check_token(token: str, source: str) -> str:
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{source}: a bearer token must be non-empty printable ASCII without spaces")
    return token


class ServiceSettings(BaseSettings):
    """Fields every service has.

    Args:
        host, port: where uvicorn listens (port 0 picks a free port).
        log_level: uvicorn's and the ``splitunet``/``services`` loggers' level.
        auth_token: one accepted bearer token. ``auth_tokens``: more accepted tokens (env: JSON list or
            comma-separated). ``auth_token_file``: a file of accepted tokens, one per line (re-read when it
            changes, see :mod:`splitunet.service.auth`).
        auth_disabled: must be ``True`` to run without any token (development only).
        scope_token_files: the token file of each further credential scope (e.g. ``audit``), one file per scope.
        scope_tokens: a token per further scope given directly (tests).
        max_request_bytes: larger request bodies get 413 before they are read.
        max_json_bytes: limit of a JSON request body (411 without ``Content-Length``, 413 above it).
        public_docs: serve ``/docs`` and ``/openapi.json`` without a credential (default: any valid token).
        tls_cert_file, tls_key_file: serve HTTPS with this certificate chain and key (both or neither).
        tls_ca_file: CA bundle used to verify client certificates.
        tls_client_auth: ``none`` | ``required`` (mutual TLS; needs ``tls_ca_file``).
        trusted_proxies: addresses of reverse proxies whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` headers are
            believed (uvicorn's ``forwarded_allow_ips``); empty (default): those headers are ignored, so the log
            records the connecting peer and nothing a client writes turns plain HTTP into "HTTPS".
        max_connections, header_timeout_s, body_idle_timeout_s, max_header_bytes: the server's bounds per
            connection (:mod:`splitunet.service.server`): open connections, seconds for a request's headers, seconds
            a body may stall, bytes of request line + headers.
    """

    #: The scope ``auth_token*`` configure (the party that calls this service's main API).
    primary_scope: ClassVar[Scope] = Scope.OPERATOR

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: LogLevel = LogLevel.INFO
    auth_token: SecretStr | None = None
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    auth_token_file: Path | None = None
    auth_disabled: bool = False
    scope_token_files: dict[Scope, Path] = Field(default_factory=dict)
    scope_tokens: dict[Scope, SecretStr] = Field(default_factory=dict)
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, gt=0)
    max_json_bytes: int = Field(default=DEFAULT_MAX_JSON_BYTES, gt=0, le=64 * 2**20)
    public_docs: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_client_auth: ClientAuth = ClientAuth.NONE
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list, max_length=64)
    max_connections: int = Field(default=128, ge=1, le=65536)
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    body_idle_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    max_header_bytes: int = Field(default=64 * 2**10, ge=1024, le=2**20)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _no_wildcard(cls, value: list[str]) -> list[str]:
        if "*" in value:
            raise ValueError("trusted_proxies: name the proxies' addresses; '*' would trust every client's headers")
        return value

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        prefix = str(self.model_config.get("env_prefix", "")).upper()
        if self.auth_token_file is not None and not Path(self.auth_token_file).is_file():
            raise ValueError(f"auth_token_file: no such file {str(self.auth_token_file)!r}")
        tokens = self.accepted_tokens()
        if not tokens and not self.auth_disabled:
            raise ValueError(
                f"no auth token configured: set {prefix}AUTH_TOKEN or {prefix}AUTH_TOKEN_FILE (a mounted "
                f"secret), or {prefix}AUTH_DISABLED=true for local development only"
            )
        if tokens and self.auth_disabled:
            raise ValueError("auth_disabled=True contradicts the configured auth tokens; remove one of them")
        seen: dict[str, str] = {t: self.primary_scope.value for t in tokens}
        for scope in set(self.scope_token_files) | set(self.scope_tokens):
            scoped = [self.scope_tokens[scope].get_secret_value()] if scope in self.scope_tokens else []
            if scope in self.scope_token_files:
                path = self.scope_token_files[scope]
                if not Path(path).is_file():
                    raise ValueError(f"scope_token_files.{scope.value}: no such file {str(path)!r}")
                scoped += read_secret_file(path)
            for token in scoped:
                _check_token(token, f"scope_tokens.{scope.value}")
                if seen.setdefault(token, scope.value) != scope.value:
                    raise ValueError(
                        f"one token serves two scopes ({seen[token]} and {scope.value}); give each scope its own"
                    )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together (or neither)")
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {str(path)!r}")
        if self.tls_client_auth is not ClientAuth.NONE and (self.tls_ca_file is None or not self.tls_enabled):
            raise ValueError(
                f"tls_client_auth={self.tls_client_auth.value} needs tls_cert_file, tls_key_file, tls_ca_file"
            )
        return self

    def accepted_tokens(self) -> tuple[str, ...]:
        """All accepted bearer tokens: ``auth_token``, ``auth_tokens``, then the file's (read now)."""
        tokens: list[str] = []
        if self.auth_token is not None:
            tokens.append(_check_token(self.auth_token.get_secret_value(), "auth_token"))
        tokens += [_check_token(t.get_secret_value(), "auth_tokens") for t in self.auth_tokens]
        if self.auth_token_file is not None:
            tokens += [_check_token(t, "auth_token_file") for t in read_secret_file(self.auth_token_file)]
        return tuple(dict.fromkeys(tokens))

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_enabled else "http"

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``: bind address, logging, TLS, the bounded
        HTTP protocol (:mod:`splitunet.service.server`) and the proxies trusted for forwarded headers (none by
        default: uvicorn's own default trusts them from 127.0.0.1)."""
        from splitunet.service.server import ConnectionLimits, bounded_protocol

        limits = ConnectionLimits(max_connections=self.max_connections, header_timeout_s=self.header_timeout_s,
                                  body_idle_timeout_s=self.body_idle_timeout_s, max_header_bytes=self.max_header_bytes)
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "log_level": self.log_level.value,
            "log_config": self.logging_config(),
            "http": bounded_protocol(limits),
            "proxy_headers": bool(self.trusted_proxies),
            "server_header": False,
        }
        if self.trusted_proxies:
            kwargs["forwarded_allow_ips"] = list(self.trusted_proxies)
        if self.tls_enabled:
            kwargs |= {"ssl_certfile": str(self.tls_cert_file), "ssl_keyfile": str(self.tls_key_file)}
            if self.tls_ca_file is not None:
                kwargs["ssl_ca_certs"] = str(self.tls_ca_file)
            kwargs["ssl_cert_reqs"] = self.tls_client_auth.cert_reqs()
        return kwargs

    def logging_config(self) -> dict[str, Any]:
        """uvicorn's logging dict config, extended so the ``splitunet`` and ``services`` loggers print too."""
        from uvicorn.config import LOGGING_CONFIG

        config = copy.deepcopy(LOGGING_CONFIG)
        level = "DEBUG" if self.log_level is LogLevel.TRACE else self.log_level.value.upper()
        for name in ("splitunet", "services"):
            config["loggers"][name] = {"handlers": ["default"], "level": level, "propagate": False}
        return config
