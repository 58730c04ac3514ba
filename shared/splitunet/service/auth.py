"""Bearer-token authentication of the calls between services, one token set per credential scope.

Every route a service registers through :func:`splitunet.service.app.create_service_app` (except health,
readiness and metrics) requires ``Authorization: Bearer <token>`` with a token of the scope the route declares
(:mod:`splitunet.service.scopes`); :class:`~splitunet.service.gate.GateMiddleware` checks it before the body is
read. Tokens are compared with :func:`hmac.compare_digest` against *every* accepted token of every scope, so
timing reveals neither which token matched nor how much of it. A token accepted by two scopes at once (a token
file changed at run time to hold another scope's token) is refused: the one-token-one-scope rule the settings check
at start-up holds after every reload too. Several tokens can be accepted at once, for
rotation; a token file is re-read when it changes (Kubernetes updates mounted Secrets in place), so a rotation
needs no restart, and emptying or deleting the file revokes its tokens at the next request. Tokens never appear
in logs, error bodies or status: only a short digest (the *principal*) identifies a caller.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from splitunet.errors import AuthError, ConfigurationError
from splitunet.service.scopes import AUTH_SCOPE_KEY, Scope
from splitunet.service.settings import ServiceSettings, read_secret_file

logger = logging.getLogger(__name__)


class BearerAuth:
    """Verifies bearer tokens.

    Args:
        tokens: accepted tokens given directly.
        token_file: a file of accepted tokens, one per line; re-read whenever its mtime or size changes. A file
            that is emptied, deleted or unreadable after start-up accepts no token any more (revocation fails
            closed; logged).
        disabled: accept every request; must be explicit, and only for development.

    Raises:
        ConfigurationError: no token from any source and ``disabled`` is false.
    """

    def __init__(
        self, *, tokens: Sequence[str] = (), token_file: str | Path | None = None, disabled: bool = False
    ) -> None:
        self.disabled = disabled
        self._static = tuple(t.encode("utf-8") for t in tokens)
        self._file = Path(token_file) if token_file is not None else None
        self._file_tokens: tuple[bytes, ...] = ()
        self._file_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        if self._file is not None:
            self._reload(strict=True)
        if disabled and (self._static or self._file is not None):
            raise ConfigurationError("auth disabled=True contradicts the configured tokens")
        if not disabled and not self.accepted():
            raise ConfigurationError(
                "no bearer token configured; give a token or token file, or disable auth explicitly (dev only)"
            )

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> BearerAuth:
        static = [t.get_secret_value() for t in settings.auth_tokens]
        if settings.auth_token is not None:
            static.insert(0, settings.auth_token.get_secret_value())
        return cls(tokens=static, token_file=settings.auth_token_file, disabled=settings.auth_disabled)

    def _reload(self, *, strict: bool) -> None:
        assert self._file is not None
        try:
            st = os.stat(self._file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._file_stamp:
                return
            tokens = tuple(t.encode("utf-8") for t in read_secret_file(self._file))
        except (OSError, ValueError) as exc:
            if strict:
                raise ConfigurationError(f"cannot read the auth token file: {exc}") from None
            if self._file_tokens or self._file_stamp is not None:
                logger.warning("auth token file %s is gone, empty or unreadable: its tokens are revoked", self._file)
            self._file_tokens, self._file_stamp = (), None
            return
        self._file_tokens, self._file_stamp = tokens, stamp
        if not strict:
            logger.info("auth token file changed; %d token(s) now accepted from it", len(tokens))

    def accepted(self) -> tuple[bytes, ...]:
        """The accepted tokens now (re-reading the token file if it changed)."""
        if self._file is not None:
            with self._lock:
                self._reload(strict=False)
        return self._static + self._file_tokens

    def matches(self, given: bytes) -> bool:
        """Whether ``given`` is an accepted token (constant time in the token's content)."""
        ok = False
        for candidate in self.accepted():
            ok |= hmac.compare_digest(given, candidate)
        return ok

    def verify(self, authorization: str | None) -> None:
        """Check an ``Authorization`` header value; raise :class:`AuthError` (401) unless it is accepted."""
        if self.disabled:
            return
        if not self.matches(bearer_token(authorization)):
            raise AuthError("invalid bearer token")


def bearer_token(authorization: str | None) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header value; :class:`AuthError` if absent/malformed."""
    if not authorization:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return token.encode("utf-8", "surrogateescape")


class InsufficientScopeError(AuthError):
    """A valid token of another scope (403 ``insufficient_scope``): e.g. an operator token on a site."""

    code = "insufficient_scope"
    status_code = 403


@dataclass(frozen=True)
class AuthDecision:
    """What the gate decided: the scope the caller authenticated with and a token digest naming the caller."""

    scope: Scope | None
    principal: str


class ScopedAuth:
    """One :class:`BearerAuth` per credential scope.

    Args:
        auths: the accepted tokens of each scope; a scope absent here accepts nobody.
        disabled: accept every request (development only; must be explicit).
    """

    def __init__(self, auths: Mapping[Scope, BearerAuth], *, disabled: bool = False) -> None:
        self.auths = {Scope(k): v for k, v in auths.items()}
        self.disabled = disabled

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ScopedAuth:
        """The primary scope from ``auth_token*``; other scopes from ``scope_token_files`` / ``scope_tokens``."""
        if settings.auth_disabled:
            return cls({}, disabled=True)
        auths = {settings.primary_scope: BearerAuth.from_settings(settings)}
        for scope in set(settings.scope_token_files) | set(settings.scope_tokens):
            if scope == settings.primary_scope:
                continue
            static = [settings.scope_tokens[scope].get_secret_value()] if scope in settings.scope_tokens else []
            auths[scope] = BearerAuth(tokens=static, token_file=settings.scope_token_files.get(scope))
        return cls(auths)

    def authenticate(self, authorization: str | None, need: Scope | None) -> AuthDecision:
        """Check a header for scope ``need`` (``None``: any scope); raise 401 :class:`AuthError` or 403
        :class:`InsufficientScopeError`. Every scope's tokens are compared, whatever matches first."""
        if self.disabled:
            return AuthDecision(scope=need, principal="anonymous")
        given = bearer_token(authorization)
        matched = [scope for scope, auth in self.auths.items() if auth.matches(given)]
        if not matched:
            raise AuthError("invalid bearer token")
        if len(matched) > 1:
            # One token, one scope: checked at start-up by the settings, and here again on every request, since a
            # token file re-read at run time (a rotation) may now hold another scope's token. Fail closed.
            logger.error("a presented token is configured for scopes %s at once (a token file changed at run time?);"
                         " refused until each scope has its own token", sorted(s.value for s in matched))
            raise AuthError("this token is configured for more than one credential scope; it is refused until the "
                            "service's operator gives each scope its own token")
        if need is not None and need not in matched:
            raise InsufficientScopeError(
                f"this endpoint needs a credential of scope {need.value!r}", detail={"required_scope": need.value}
            )
        scope = need if need is not None else matched[0]
        return AuthDecision(scope=scope, principal=f"{scope.value}:{hashlib.sha256(given).hexdigest()[:16]}")


async def require_auth(request: Request) -> None:
    """FastAPI dependency kept for routers built before scopes: passes only what the gate authenticated."""
    if request.scope.get(AUTH_SCOPE_KEY) is None:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")


def principal(request: Request) -> str:
    """The caller the gate authenticated (``scope:digest``; ``anonymous`` when auth is disabled)."""
    decision = request.scope.get(AUTH_SCOPE_KEY)
    return decision.principal if decision is not None else "anonymous"
