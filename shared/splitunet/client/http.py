"""``ServiceClient``: the operator's connection to one service (the aggregator's job API or the audit service).

It is the services' own :class:`~splitunet.service.client.PeerClient` (one ``httpx.Client``, explicit timeouts,
bounded retries with backoff, optional TLS and mutual TLS, an injectable transport) with one difference: a peer
service keeps only a peer's error ``code`` (a remote body never reaches its own job status), while an operator
wants the whole answer, so errors are raised as :mod:`splitunet.client.errors` describes, with the service's
``{code, message, detail}``.

Retries (``PeerClient``'s policy): a connection that could not be made is retried for every call (the request never
reached the service); a read timeout, a dropped connection or a 502/503/504 only for idempotent calls (``GET``,
and the ``POST`` routes this client marks idempotent: inference). Submitting, stopping or resuming a job and
starting an audit are never retried once the request may have arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from splitunet.client.errors import ServiceUnreachableError, error_from_response
from splitunet.errors import ConfigurationError, PeerError
from splitunet.service.client import PeerClient, PeerTimeouts, tls_context


def read_token(token_file: str | Path) -> str:
    """The first token of ``token_file`` (one per line, ``#`` comments skipped); :class:`ConfigurationError`
    naming the file when it cannot be read or is empty."""
    from splitunet.service.settings import read_secret_file

    try:
        return read_secret_file(Path(token_file).expanduser())[0]
    except ValueError as exc:
        raise ConfigurationError(str(exc), detail={"token_file": str(token_file)}) from None


def tls_verify(
    ca_file: str | Path | None = None, client_cert: str | Path | None = None, client_key: str | Path | None = None
) -> bool | Any:
    """``verify`` for httpx: ``True`` (system CAs) or an ``ssl.SSLContext`` trusting ``ca_file`` and presenting
    ``client_cert``/``client_key`` for mutual TLS (the same context the services build for their peers)."""
    if ca_file is None and client_cert is None and client_key is None:
        return True
    if (client_cert is None) != (client_key is None):
        raise ConfigurationError("client_cert and client_key go together: give both (mutual TLS) or neither")
    paths = {"ca_file": ca_file, "client_cert": client_cert, "client_key": client_key}
    for name, path in paths.items():
        if path is not None and not Path(path).expanduser().is_file():
            raise ConfigurationError(f"{name} {str(path)!r} is not a readable file", detail={name: str(path)})
    expand = {k: Path(v).expanduser() if v is not None else None for k, v in paths.items()}
    return tls_context(ca_file=expand["ca_file"], cert_file=expand["client_cert"], key_file=expand["client_key"])


class ServiceClient(PeerClient):
    """Calls one service as an operator. Arguments as :class:`~splitunet.service.client.PeerClient`."""

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:  # noqa: D102 - see the class
        try:
            return super().request(method, path, **kwargs)
        except PeerError as exc:
            if isinstance(exc.__cause__, httpx.TransportError):
                raise ServiceUnreachableError(
                    f"{self.name} is unreachable: {type(exc.__cause__).__name__}: {exc.__cause__} "
                    f"(after {exc.detail.get('attempts')} attempt(s)); check the URL, the service and the TLS "
                    "options", detail={k: exc.detail.get(k) for k in ("url", "method", "attempts", "error")},
                ) from exc.__cause__
            raise

    def _error(self, request: httpx.Request, response: httpx.Response, attempts: int) -> Exception:
        return error_from_response(response)

    def get_model(self, path: str, model: Any, *, params: Mapping[str, Any] | None = None) -> Any:
        """GET ``path`` and parse its JSON as the pydantic ``model`` (a class or a ``TypeAdapter``)."""
        return _parse(model, self.get_json(path, params=params))

    def post_model(self, path: str, body: Any, model: Any, *, idempotent: bool = False) -> Any:
        """POST ``body`` (JSON) and parse the answer as the pydantic ``model``."""
        return _parse(model, self.post_json(path, body, idempotent=idempotent))


def _parse(model: Any, data: Any) -> Any:
    validate = getattr(model, "model_validate", None) or model.validate_python
    return validate(data)


__all__ = ["PeerTimeouts", "ServiceClient", "read_token", "tls_verify"]
