"""Bearer-token authentication of the calls between services.

Every route a service registers through :func:`splitunet.service.app.create_service_app` (except health,
readiness and metrics) requires ``Authorization: Bearer <token>`` with one of the accepted tokens. Tokens are
compared with :func:`hmac.compare_digest` against *every* accepted token, so timing reveals neither which
token matched nor how much of it. Several tokens can be accepted at once, for rotation; a token file is
re-read when it changes (Kubernetes updates mounted Secrets in place), so a rotation needs no restart.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from fastapi import Request

from splitunet.errors import AuthError, ConfigurationError
from splitunet.service.settings import ServiceSettings, read_secret_file

logger = logging.getLogger(__name__)


class BearerAuth:
    """Verifies bearer tokens.

    Args:
        tokens: accepted tokens given directly.
        token_file: a file of accepted tokens, one per line; re-read whenever its mtime or size changes. If a
            re-read fails the previous tokens stay in force (and the failure is logged).
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
            logger.warning("auth token file unreadable, keeping the previous tokens: %s", exc)
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

    def verify(self, authorization: str | None) -> None:
        """Check an ``Authorization`` header value; raise :class:`AuthError` (401) unless it is accepted."""
        if self.disabled:
            return
        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        given = token.encode("utf-8")
        ok = False
        for candidate in self.accepted():
            ok |= hmac.compare_digest(given, candidate)
        if not ok:
            raise AuthError("invalid bearer token")


async def require_auth(request: Request) -> None:
    """FastAPI dependency: verify the request against the app's :class:`BearerAuth` (``app.state.auth``)."""
    auth = getattr(request.app.state, "auth", None)
    if not isinstance(auth, BearerAuth):
        raise RuntimeError("app.state.auth is not set; build the app with create_service_app")
    auth.verify(request.headers.get("authorization"))
