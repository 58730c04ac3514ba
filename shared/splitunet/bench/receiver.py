"""The receiving end of the wire benchmark, run as its own process: ``python -m splitunet.bench.receiver``.

- ``http``: a service built with the service kit (auth, body limit, metrics middleware, as every service) whose
  route ``/v1/bundle`` decodes the posted bundle with :func:`splitunet.wire.decode_bundle` (checksum, header,
  finiteness, float32 tensors) and answers its size, ``/v1/bytes`` only reads it; served by uvicorn with the
  settings' defaults.
- ``tcp``: a raw loopback socket that reads length-prefixed messages into a preallocated buffer and answers one
  byte each: the physical limit of moving the same bytes on this machine.
"""

from __future__ import annotations

import argparse
import socket
import struct
from contextlib import contextmanager

from pydantic_settings import SettingsConfigDict

from splitunet.service.deps import BundleBody
from splitunet.service.settings import ServiceSettings


class ReceiverSettings(ServiceSettings):
    """``BENCH_*``: the benchmark receiver's settings (port, token, body limit)."""

    model_config = SettingsConfigDict(env_prefix="BENCH_")


def create_app(settings: ReceiverSettings | None = None):
    """The HTTP receiver: ``POST /v1/bundle`` decodes the bundle and answers ``{"bytes": n, "tensors": k}``;
    ``POST /v1/bytes`` only reads the body (the HTTP stack's share of the time, without the codec)."""
    from fastapi import APIRouter

    from splitunet import __version__
    from splitunet.service.app import create_service_app
    from splitunet.service.gate import body_limit
    from splitunet.wire import decode_bundle

    settings = settings or ReceiverSettings()
    router = APIRouter(prefix="/v1")

    # a tensor route declares its body limit (every other body is limited to max_json_bytes)
    @router.post("/bundle", dependencies=[body_limit(lambda s: s.max_request_bytes)])
    def receive(body: BundleBody) -> dict[str, int]:
        bundle = decode_bundle(body, max_bytes=settings.max_request_bytes)
        return {"bytes": bundle.wire_bytes, "tensors": len(bundle.tensors)}

    @router.post("/bytes", dependencies=[body_limit(lambda s: s.max_request_bytes)])
    def receive_only(body: BundleBody) -> dict[str, int]:
        return {"bytes": len(body), "tensors": 0}

    @contextmanager
    def runtime(_settings: ReceiverSettings):
        yield object()

    return create_service_app(title="splitunet-bench-receiver", version=__version__, settings=settings,
                              runtime_factory=runtime, routers=[router])


def serve_tcp(port: int) -> None:
    """Accept one connection; for each ``<8-byte length><bytes>`` read the bytes fully, answer ``b"k"``."""
    with socket.create_server(("127.0.0.1", port)) as server:
        conn, _ = server.accept()
        with conn:
            buffer = bytearray()
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    return
                (n,) = struct.unpack("<Q", head)
                if len(buffer) < n:
                    buffer = bytearray(n)
                view = memoryview(buffer)[:n]
                got = 0
                while got < n:
                    k = conn.recv_into(view[got:])
                    if k == 0:
                        return
                    got += k
                conn.sendall(b"k")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitunet.bench.receiver", description=__doc__)
    parser.add_argument("mode", choices=("http", "tcp"))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.mode == "tcp":
        serve_tcp(args.port)
        return 0
    import uvicorn

    settings = ReceiverSettings(port=args.port)
    uvicorn.run(create_app(settings), **(settings.uvicorn_kwargs() | {"log_level": "warning"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
