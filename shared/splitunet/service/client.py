"""``PeerClient``: how one service calls another (the aggregator calling a site, the audit calling the aggregator).

One :class:`PeerClient` per peer wraps one ``httpx.Client``, created once (in the caller's lifespan or job)
and reused for every call, with explicit timeouts, a bearer token, optional TLS (CA bundle, client certificate
for mutual TLS) and an injectable transport (tests pass ``httpx.MockTransport`` or a Starlette ``TestClient``'s
transport and need no network). It is thread-safe (``httpx.Client`` is), so an aggregator can call K sites
concurrently from a thread pool.

Retries are bounded (``retries`` extra attempts, exponential backoff):

- a connection that could not be made (``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``) is retried for
  every call: the request never reached the peer;
- other transport errors (read timeout, dropped connection) and 502/503/504 answers are retried only for
  idempotent calls (GET/HEAD/PUT/DELETE/OPTIONS by default; a POST is idempotent only when the caller says so);
- other HTTP errors are never retried.

Failures raise :class:`splitunet.errors.PeerError` (HTTP 502 when re-raised by a service) whose ``detail`` is
``{peer, method, url, status, code, message, detail, attempts}``; ``code``/``message``/``detail`` are the peer's
own :class:`~splitunet.service.errors.ErrorBody` when it sent one (``code`` is ``None`` for transport errors).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from splitunet.errors import PeerError, WireFormatError
from splitunet.wire import CONTENT_TYPE, DEFAULT_MAX_BYTES, Bundle, BundleExpectation, decode_bundle

logger = logging.getLogger(__name__)

_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_RETRY_STATUSES = frozenset({502, 503, 504})
#: A peer's error code we pass on (stable codes only; never its message or detail).
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class BodyChunks:
    """A request body sent as zero-copy slices of at most ``chunk_bytes`` (re-iterable, so a retry resends it).

    httpcore writes a body with ``send`` and keeps ``buffer[n:]`` after each partial send: for one ``bytes``
    body that copies the rest of the buffer on every send, quadratic in its size (a 64 MiB bundle took 0.28 s to
    post on loopback where 1 MiB slices take 0.15 s, ``python -m splitunet.bench.wire_throughput``). Send it with
    an explicit ``Content-Length`` header, or httpx would switch to chunked transfer, which services refuse.
    """

    def __init__(self, data: bytes | bytearray | memoryview, chunk_bytes: int = 1 << 20) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self._view = memoryview(data).cast("B")
        self._chunk = chunk_bytes

    def __len__(self) -> int:
        return self._view.nbytes

    def __iter__(self) -> Iterator[memoryview]:
        for start in range(0, self._view.nbytes, self._chunk):
            yield self._view[start : start + self._chunk]


@dataclass(frozen=True)
class PeerTimeouts:
    """Timeouts in seconds: connect, read (between bytes), write (between bytes), pool (wait for a connection)."""

    connect: float = 5.0
    read: float = 120.0
    write: float = 120.0
    pool: float = 10.0

    def __post_init__(self) -> None:
        for name in ("connect", "read", "write", "pool"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"timeouts.{name} must be a positive number of seconds, got {value!r}")

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


def tls_context(
    *, ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> ssl.SSLContext:
    """A client TLS context verifying the peer with ``ca_file`` (or the system CAs) and, for mutual TLS,
    presenting ``cert_file``/``key_file``."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file must be given together (or neither)")
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file))
    return context


class PeerClient:
    """Calls one peer service.

    Args:
        base_url: the peer's base URL, e.g. ``https://site-t1:8443``.
        name: the peer's name in errors and logs (default: ``base_url``).
        token: bearer token sent on every call (``None``: no ``Authorization`` header).
        timeouts: explicit timeouts (see :class:`PeerTimeouts`).
        retries: extra attempts after a retryable failure, ``0..10``.
        backoff_s: first backoff; doubles per attempt, capped at ``backoff_max_s``.
        verify: ``True`` (system CAs), ``False`` (no verification; tests only) or an ``ssl.SSLContext``
            (see :func:`tls_context`).
        max_response_bytes: larger response bodies are refused while streaming (PeerError).
        transport: an ``httpx.BaseTransport`` to use instead of the network.
        sleep: called with each backoff delay (tests pass a recorder).
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        token: str | None = None,
        timeouts: PeerTimeouts | None = None,
        retries: int = 2,
        backoff_s: float = 0.2,
        backoff_max_s: float = 5.0,
        verify: bool | ssl.SSLContext = True,
        max_response_bytes: int = DEFAULT_MAX_BYTES,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ValueError(f"retries must be an integer in 0..10, got {retries!r}")
        if backoff_s < 0 or backoff_max_s < backoff_s:
            raise ValueError(f"need 0 <= backoff_s <= backoff_max_s, got {backoff_s}, {backoff_max_s}")
        if max_response_bytes <= 0:
            raise ValueError(f"max_response_bytes must be positive, got {max_response_bytes}")
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self.timeouts = timeouts or PeerTimeouts()
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_response_bytes = max_response_bytes
        self._sleep = sleep
        # identity: responses are bounded by max_response_bytes as sent; bundles carry their own zstd.
        headers = {"Accept-Encoding": "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=self.timeouts.to_httpx(),
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- typed calls ------------------------------------------------------------------------------------------

    def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        return self._json(self.request("GET", path, params=params))

    def post_json(self, path: str, body: Any, *, idempotent: bool = False) -> Any:
        return self._json(self.request("POST", path, json=body, idempotent=idempotent))

    def post_json_for_bundle(
        self,
        path: str,
        body: Any,
        *,
        expect: BundleExpectation | None = None,
        max_bytes: int | None = None,
        idempotent: bool = False,
    ) -> Bundle:
        """POST JSON, receive a wire bundle (e.g. a site's forward) and decode it against ``expect``."""
        response = self.request("POST", path, json=body, idempotent=idempotent, accept=CONTENT_TYPE)
        return self._bundle(response, expect, max_bytes)

    def post_bundle(
        self, path: str, data: bytes, *, params: Mapping[str, Any] | None = None, idempotent: bool = False
    ) -> Any:
        """POST an encoded wire bundle (e.g. gradients for a site's backward), receive JSON."""
        headers = {"Content-Type": CONTENT_TYPE, "Content-Length": str(len(data))}
        return self._json(self.request(
            "POST", path, content=BodyChunks(data), params=params, headers=headers, idempotent=idempotent
        ))

    # -- the one request path -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        accept: str = "application/json",
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request with bounded retries; return the (fully read) 2xx response or raise PeerError.

        ``kwargs`` go to ``httpx.Client.build_request`` (``json``, ``content``, ``params``).
        """
        method = method.upper()
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS
        request = self._client.build_request(method, path, headers={"Accept": accept, **(headers or {})}, **kwargs)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._send(request)
            except httpx.TransportError as exc:
                retryable = isinstance(exc, _NOT_SENT) or idempotent
                if retryable and attempt <= self.retries:
                    self._backoff(attempt, f"{type(exc).__name__}: {exc}")
                    continue
                raise PeerError(
                    f"{self.name}: {method} {request.url.path} failed after {attempt} attempt(s): "
                    f"{type(exc).__name__}: {exc}",
                    detail=self._detail(request, attempt, status=None, error=type(exc).__name__),
                ) from exc
            if response.is_success:
                return response
            if idempotent and response.status_code in _RETRY_STATUSES and attempt <= self.retries:
                self._backoff(attempt, f"HTTP {response.status_code}")
                continue
            raise self._error(request, response, attempt)

    def _send(self, request: httpx.Request) -> httpx.Response:
        response = self._client.send(request, stream=True)
        try:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_response_bytes:
                raise self._too_large(request)
            chunks, size = [], 0
            for chunk in response.iter_bytes():  # decoded bytes, so a compressed bomb is capped too
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise self._too_large(request)
                chunks.append(chunk)
        finally:
            response.close()
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() != "content-encoding"]
        return httpx.Response(response.status_code, headers=headers, content=b"".join(chunks), request=request)

    def _too_large(self, request: httpx.Request) -> PeerError:
        return PeerError(
            f"{self.name}: response to {request.method} {request.url.path} exceeds {self.max_response_bytes} bytes",
            detail=self._detail(request, 1, status=None, error="response_too_large"),
        )

    def _backoff(self, attempt: int, reason: str) -> None:
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        logger.warning("%s: attempt %d failed (%s); retrying in %.2f s", self.name, attempt, reason, delay)
        self._sleep(delay)

    def _detail(self, request: httpx.Request, attempts: int, *, status: int | None, **extra: Any) -> dict:
        return {
            "peer": self.name,
            "method": request.method,
            "url": str(request.url),
            "status": status,
            "attempts": attempts,
            "code": None,
            "message": None,
            "detail": None,
            **extra,
        }

    def _error(self, request: httpx.Request, response: httpx.Response, attempts: int) -> PeerError:
        """The error of a failed call. Only the status and the peer's stable error ``code`` are kept: a remote
        response body is never echoed into our errors or job status (it is logged, truncated, at DEBUG)."""
        detail = self._detail(request, attempts, status=response.status_code)
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        code = body.get("code") if isinstance(body, dict) else None
        if isinstance(code, str) and _CODE_RE.match(code):
            detail["code"] = code
        logger.debug("%s answered %d: %r", self.name, response.status_code, response.text[:200])
        text = detail["code"] or response.reason_phrase
        return PeerError(
            f"{self.name}: {request.method} {request.url.path} -> HTTP {response.status_code} {text}", detail=detail
        )

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PeerError(
                f"{self.name}: {response.request.method} {response.request.url.path} returned invalid JSON",
                detail=self._detail(response.request, 1, status=response.status_code, error="invalid_json"),
            ) from exc

    def _bundle(self, response: httpx.Response, expect: BundleExpectation | None, max_bytes: int | None) -> Bundle:
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != CONTENT_TYPE:
            raise PeerError(
                f"{self.name}: expected a {CONTENT_TYPE} response, got {content_type or 'none'!r}",
                detail=self._detail(response.request, 1, status=response.status_code, error="bad_content_type"),
            )
        try:
            return decode_bundle(response.content, expect=expect, max_bytes=max_bytes or self.max_response_bytes)
        except WireFormatError as exc:  # a bad bundle from a peer is the peer's failure, not our caller's
            detail = self._detail(response.request, 1, status=response.status_code, error="bad_bundle")
            detail |= {"code": exc.code}
            logger.warning("%s sent an invalid bundle: %s", self.name, exc.message[:200])
            raise PeerError(f"{self.name}: sent an invalid bundle ({exc.code})", detail=detail) from exc
