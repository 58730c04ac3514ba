"""Half-open connections against each HTTP server option: ``python -m splitunet.bench.connections``.

The attack of issue 22: a client on the network opens many TCP connections to a service and sends no request, or
half a request line, and never a token. Each option serves the same kit app (the wire benchmark's receiver, auth
on) as its own process on 127.0.0.1; the bench opens ``--connections`` such connections (half silent, half with
a partial request line), then prints, per option:

- ``fds@2s`` / ``fds@end``: open file descriptors of the server's processes 2 s after the flood and at the end
  (``--hold`` seconds later);
- ``closed``: how many of the bench's connections the server had closed by the end;
- ``ok@2s``, ``ok@end``: whether a fresh authenticated request was answered then (``/healthz``, 5 s timeout).

Options: ``uvicorn-default`` (what the services ran before: uvicorn's defaults), ``uvicorn-tuned``
(``limit_concurrency``, ``timeout_keep_alive``, h11 with ``h11_max_incomplete_event_size``), ``kit`` (the kit's
bounded protocol, :mod:`splitunet.service.server`, as ``splitunet serve`` runs it), ``hypercorn``
(``keep_alive_timeout``, ``read_timeout``) and ``granian`` (``header_read_timeout``, ``backpressure``); the last
two only when installed. Loopback only; the figures are machine- and load-dependent.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "bench-connections-token-0123456789"
VARIANTS = ("uvicorn-default", "uvicorn-tuned", "kit", "hypercorn", "granian")
#: The bounds every hardened option is configured with (the kit's defaults).
MAX_CONNECTIONS, HEADER_TIMEOUT_S = 128, 10


def bench_app():
    """The app under test (a factory: granian imports it by name)."""
    from splitunet.bench.receiver import ReceiverSettings, create_app

    return create_app(ReceiverSettings(auth_token=TOKEN, host="127.0.0.1"))


def serve(variant: str, port: int) -> None:
    """Run ``variant`` on 127.0.0.1:``port`` until killed (the child process)."""
    if variant in ("uvicorn-default", "uvicorn-tuned", "kit"):
        import uvicorn

        from splitunet.bench.receiver import ReceiverSettings

        settings = ReceiverSettings(auth_token=TOKEN, host="127.0.0.1", port=port, log_level="warning",
                                    max_connections=MAX_CONNECTIONS, header_timeout_s=HEADER_TIMEOUT_S)
        if variant == "kit":
            kwargs = settings.uvicorn_kwargs()
        else:
            kwargs = {"host": "127.0.0.1", "port": port, "log_level": "warning"}
            if variant == "uvicorn-tuned":
                kwargs |= {"limit_concurrency": MAX_CONNECTIONS, "timeout_keep_alive": 5, "http": "h11",
                           "h11_max_incomplete_event_size": 64 * 2**10}
        uvicorn.run(bench_app(), **kwargs)
    elif variant == "hypercorn":
        import asyncio

        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.keep_alive_timeout = 5
        config.read_timeout = HEADER_TIMEOUT_S
        config.loglevel = "WARNING"
        asyncio.run(hypercorn_serve(bench_app(), config))
    elif variant == "granian":
        from granian.constants import Interfaces
        from granian.http import HTTP1Settings
        from granian.server import Server

        Server("splitunet.bench.connections:bench_app", address="127.0.0.1", port=port, interface=Interfaces.ASGI,
               factory=True, backpressure=MAX_CONNECTIONS, log_level="warning",
               http1_settings=HTTP1Settings(header_read_timeout=HEADER_TIMEOUT_S * 1000)).serve()
    else:
        raise SystemExit(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def open_fds(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


def _answered(url: str) -> str:
    try:
        r = httpx.get(f"{url}/healthz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5.0)
        return str(r.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)  # EOF, or an error response before the close
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def measure(variant: str, connections: int, hold_s: float, port: int) -> dict[str, object] | None:
    """Start ``variant``, flood it, measure; ``None`` when the server is not installed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splitunet.bench.connections", "--serve", variant,
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _answered(url) != "200":
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                if "ModuleNotFoundError" in err:
                    return None
                raise RuntimeError(f"{variant} did not start: {err[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant} did not answer in 60 s")
            time.sleep(0.2)
        before = open_fds(proc.pid)
        socks = []
        for i in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                s.sendall(b"POST /v1/bytes HTTP/1.1\r\nHost: x\r\n")  # half a request, never finished
            socks.append(s)
        time.sleep(2.0)
        fds_2s, ok_2s = open_fds(proc.pid), _answered(url)
        time.sleep(max(0.0, hold_s - 2.0))
        fds_end, ok_end = open_fds(proc.pid), _answered(url)
        closed = sum(_closed_by_server(s) for s in socks)
        for s in socks:
            s.close()
        return {"variant": variant, "fds_before": before, "fds_2s": fds_2s, "fds_end": fds_end, "closed": closed,
                "ok_2s": ok_2s, "ok_end": ok_end}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=18731)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--hold", type=float, default=15.0, help="seconds from the flood to the last measure")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return
    print(f"{args.connections} half-open connections to 127.0.0.1, measured 2 s and {args.hold:.0f} s after; "
          f"hardened options bounded at {MAX_CONNECTIONS} connections / {HEADER_TIMEOUT_S} s for headers")
    print(f"{'option':<16} {'fds before':>10} {'fds@2s':>7} {'fds@end':>8} {'closed':>7} {'ok@2s':>14} {'ok@end':>14}")
    for i, variant in enumerate(args.variants.split(",")):
        row = measure(variant, args.connections, args.hold, args.port + i)
        if row is None:
            print(f"{variant:<16} not installed")
            continue
        print(f"{variant:<16} {row['fds_before']:>10} {row['fds_2s']:>7} {row['fds_end']:>8} {row['closed']:>7} "
              f"{row['ok_2s']:>14} {row['ok_end']:>14}")


if __name__ == "__main__":
    main()
