"""P1, wire efficiency: bundles over HTTP to a local service versus the same bytes over a raw loopback socket.

One iteration of the HTTP path is what a site does for one forward: ``encode_bundle`` (cast, checks, frame,
SHA-256) + POST on a kept-alive connection + the receiver's ``decode_bundle`` (checksum, header, finiteness,
float32 tensors) + its small JSON answer. One iteration of the raw path sends the same number of bytes over a
kept-alive loopback TCP connection to a process that reads them into a buffer and answers one byte. Both
receivers are separate processes; the figure is the ratio of the two median throughputs measured in one run.
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WireThroughput:
    """Medians over ``iterations`` (after one warm-up), seconds per bundle and bytes per second.

    ``http_s`` is the P1 path (encode + POST + decode + answer); ``transfer_s`` the same POST of the already encoded
    bytes to a route that only reads them (the HTTP stack's share); ``encode_s`` and ``decode_s`` the codec's two
    halves timed in this process; ``cast_s`` the two dtype conversions alone (fp32 -> fp16 at the sender, fp16 ->
    fp32 at the receiver), per-byte work that any fp16 wire format does; ``tcp_s`` the raw loopback socket.
    """

    bundle_bytes: int
    iterations: int
    http_bytes_per_s: float
    tcp_bytes_per_s: float
    encode_s: float
    decode_s: float
    cast_s: float
    transfer_s: float
    http_s: float
    tcp_s: float

    @property
    def efficiency(self) -> float:
        """P1: HTTP throughput / raw TCP throughput (1.0 = the wire format and HTTP cost nothing)."""
        return self.http_bytes_per_s / self.tcp_bytes_per_s

    @property
    def cast_bound(self) -> float:
        """The P1 that would remain if the raw transfer were followed by the two dtype casts and nothing else."""
        return self.tcp_s / (self.tcp_s + self.cast_s)

    def to_dict(self) -> dict:
        return asdict(self) | {"p1_wire_efficiency": self.efficiency, "p1_cast_bound": self.cast_bound}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(mode: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "splitunet.bench.receiver", mode, "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )


def _connect(port: int, process: subprocess.Popen, timeout_s: float = 60) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the receiver exited: {process.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure_wire(megabytes: float = 64.0, iterations: int = 5, *, threads: int = 1) -> WireThroughput:
    """Measure P1 with an fp16 bundle of about ``megabytes`` MiB (``B, C, X, Y, Z`` activations), sent the way the
    services send bundles (:meth:`splitunet.service.client.PeerClient.post_bundle`)."""
    import torch

    from splitunet.service.client import PeerClient
    from splitunet.wire import BundleMeta, WireDtype, decode_bundle, encode_bundle

    torch.set_num_threads(threads)
    voxels = int(megabytes * 2**20 / 2 / 16)  # fp16, 16 channels
    side = round(voxels ** (1 / 3))
    tensors = {"level0": torch.randn(1, 16, side, side, max(1, voxels // side**2))}
    meta = BundleMeta(run_id="bench", step=1, site="bench", kind="activations")
    limit = 4 * 2**30
    sample = encode_bundle(tensors, meta=meta, dtype=WireDtype.FP16, max_bytes=limit)
    token = secrets.token_urlsafe(16)
    env = {"BENCH_AUTH_TOKEN": token, "BENCH_MAX_REQUEST_BYTES": str(limit), "BENCH_TORCH_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    http_port, tcp_port = _free_port(), _free_port()
    http_proc, tcp_proc = _start("http", http_port, env), _start("tcp", tcp_port, env)
    try:
        _connect(http_port, http_proc).close()
        encode, http, transfer = [], [], []
        with PeerClient(f"http://127.0.0.1:{http_port}", token=token, retries=0) as client:
            for _ in range(iterations + 1):
                t0 = time.perf_counter()
                data = encode_bundle(tensors, meta=meta, dtype=WireDtype.FP16, max_bytes=limit)
                t1 = time.perf_counter()
                client.post_bundle("/v1/bundle", data)
                t2 = time.perf_counter()
                client.post_bundle("/v1/bytes", data)
                transfer.append(time.perf_counter() - t2)
                encode.append(t1 - t0)
                http.append(t2 - t0)
        raw = []
        with _connect(tcp_port, tcp_proc) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(iterations + 1):
                t0 = time.perf_counter()
                conn.sendall(struct.pack("<Q", len(sample)))
                conn.sendall(sample)
                if conn.recv(1) != b"k":
                    raise RuntimeError("the raw receiver did not acknowledge")
                raw.append(time.perf_counter() - t0)
    finally:
        for proc in (http_proc, tcp_proc):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    decode, cast = [], []
    for _ in range(iterations + 1):
        t0 = time.perf_counter()
        decode_bundle(sample, max_bytes=limit)
        t1 = time.perf_counter()
        tensors["level0"].to(torch.float16).to(torch.float32)
        cast.append(time.perf_counter() - t1)
        decode.append(t1 - t0)
    http_s, tcp_s = statistics.median(http[1:]), statistics.median(raw[1:])
    return WireThroughput(
        bundle_bytes=len(sample), iterations=iterations, http_bytes_per_s=len(sample) / http_s,
        tcp_bytes_per_s=len(sample) / tcp_s, encode_s=statistics.median(encode[1:]),
        decode_s=statistics.median(decode[1:]), cast_s=statistics.median(cast[1:]),
        transfer_s=statistics.median(transfer[1:]), http_s=http_s, tcp_s=tcp_s,
    )


if __name__ == "__main__":  # pragma: no cover - manual run
    result = measure_wire(float(sys.argv[1]) if len(sys.argv) > 1 else 64.0)
    print(result.to_dict())
