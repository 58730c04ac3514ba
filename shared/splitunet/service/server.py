"""The HTTP server protocol every service runs with: uvicorn's httptools protocol, bounded per connection.

uvicorn alone holds a connection that sends no request (or half a header, or a body that stalls) for ever: its
only timer is the keep-alive timer, armed *after* a response; ``limit_concurrency`` answers 503 to requests over
the limit but still accepts and keeps every connection. One unauthenticated client could hold thousands of file
descriptors (issue 22: 1000 half-open connections, site descriptors 17 -> 1017, none closed after 47 s). This
protocol adds, per connection (:class:`ConnectionLimits`, from the service's settings):

- ``max_connections``: a connection over the limit is closed as soon as it is accepted (the server's open
  connections, hence its descriptors, stay bounded);
- ``header_timeout_s``: the request line and headers must be complete this long after the connection opened (or
  after the previous response): a silent or slowloris connection is closed; the keep-alive timer of uvicorn
  (``timeout_keep_alive``) still closes an idle connection between requests;
- ``body_idle_timeout_s``: a request body that stalls for this long (no byte while the server is reading) closes
  the connection;
- ``max_header_bytes``: a request line plus headers above this size is answered 431 and closed.

It also writes the transport's TLS facts into the ASGI scope as the ``tls`` extension
(``scope["extensions"]["tls"]``), so the gate's "HTTPS only" check reads the transport, not ``scope["scheme"]``
(which a proxy-headers middleware rewrites from a client's ``X-Forwarded-Proto``).

Chosen over Hypercorn and granian by measurement (``python -m splitunet.bench.connections``; the figures are in
``docs/limits.md``): all three bound half-open connections once configured, this one keeps httptools + uvloop
(the wire throughput measured in ``splitunet.bench.wire_throughput``) and the kit's single ``uvicorn_kwargs``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("splitunet.service.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection bounds (see the module docstring); validated by the service settings."""

    max_connections: int = 128
    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 2**10

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_header_bytes < 1024:
            raise ValueError("max_connections must be >= 1 and max_header_bytes >= 1024")
        if self.header_timeout_s <= 0 or self.body_idle_timeout_s <= 0:
            raise ValueError("header_timeout_s and body_idle_timeout_s must be > 0")


def bounded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` protocol class bounded by ``limits`` (``uvicorn.Config(app, http=...)``)."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with the bounds of :attr:`limits` (build one with :func:`bounded_protocol`)."""

    limits: ConnectionLimits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = True
        self._refused = False
        self._tls = _tls_facts(transport)
        self._waiting_since = self.loop.time()
        if len(self.connections) > self.limits.max_connections and not self._evict_oldest_waiting():
            logger.warning("connection refused: %d open connections serve requests, the limit is %d",
                           len(self.connections) - 1, self.limits.max_connections)
            self._refused = True
            transport.close()
            return
        self._arm(self.limits.header_timeout_s, "no complete request headers")

    def _evict_oldest_waiting(self) -> bool:
        """At the limit: close the connection that has waited longest for its request headers (a half-open or
        idle one), so a flood of half-open connections cannot lock out a client that sends its request at once;
        ``False`` when every other connection is serving a request (the new one is refused)."""
        waiting = [c for c in self.connections if c is not self and isinstance(c, BoundedHttpToolsProtocol)
                   and c._in_headers and not c._refused and not c.transport.is_closing()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since)
        oldest._refused = True
        oldest._disarm()
        oldest.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ------------------------------------------------------------------ timers
    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, why)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _expire(self, why: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._in_headers and self.flow.read_paused:  # the app, not the client, is behind: wait
            self._arm(self.limits.body_idle_timeout_s, why)
            return
        logger.info("closing connection from %s: %s in time", _peer(self.client), why)
        self.transport.close()

    # ------------------------------------------------------------------ parser events
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._in_headers and self._deadline is not None:
            self._arm(self.limits.body_idle_timeout_s, "request body stalled")
        super().data_received(data)

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes and not self._refused:
            self._refused = True
            self._disarm()
            body = b"request line and headers too large"
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": dict(self._tls)}  # type: ignore[typeddict-unknown-key]
        self._in_headers, self._header_bytes = True, 0
        if self._deadline is None:  # a keep-alive or pipelined request: its headers must arrive in time too
            self._waiting_since = self.loop.time()
            self._arm(self.limits.header_timeout_s, "no complete request headers")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_header_bytes(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = False
        self._arm(self.limits.body_idle_timeout_s, "request body stalled")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()


    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined:  # idle until the next request (uvicorn's keep-alive timer closes it): evictable
            self._in_headers, self._header_bytes, self._waiting_since = True, 0, self.loop.time()


def _tls_facts(transport: asyncio.Transport) -> dict[str, Any] | None:
    """The ASGI ``tls`` extension's facts of a TLS transport (``None`` for plain TCP)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return {"tls_version": ssl_object.version(), "cipher_suite": cipher[0] if cipher else None,
            "server_cert": None, "client_cert_chain": [], "client_cert_name": None, "client_cert_error": None}


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
