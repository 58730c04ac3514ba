"""Start and stop a local federation: site and aggregator services as real uvicorn processes on 127.0.0.1.

Used by ``splitunet demo`` and by the end-to-end tests. Each service is a separate process (``python -m splitunet
serve site|aggregator``) configured only through its environment and a token file, exactly as in a deployment.
Every process runs in its own process group; :meth:`LocalFederation.stop` (also on exceptions and Ctrl-C, via the
context manager) terminates the groups and kills what does not exit.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


@dataclass
class ServiceProcess:
    """A running service: its name, base URL, process and log file."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """Site and aggregator processes on this machine.

    Args:
        workdir: logs go to ``workdir/logs``, tokens to ``workdir/secrets`` (mode 0600), state to ``workdir/state``.
        torch_threads: intra-op threads per process (keep the total near the number of cores).
        python: the interpreter that runs the services.
    """

    def __init__(self, workdir: Path, *, torch_threads: int = 1, python: str = sys.executable) -> None:
        self.workdir = Path(workdir)
        self.torch_threads = torch_threads
        self.python = python
        self.processes: list[ServiceProcess] = []
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        secrets_dir = self.workdir / "secrets"
        secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(secrets_dir, 0o700)
        self.site_token = secrets.token_urlsafe(24)
        self.aggregator_token = secrets.token_urlsafe(24)
        self.site_token_file = self._secret(secrets_dir / "site-token", self.site_token)
        self.aggregator_token_file = self._secret(secrets_dir / "aggregator-token", self.aggregator_token)

    @staticmethod
    def _secret(path: Path, value: str) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        return path

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, name: str, service: str, env: dict[str, str]) -> ServiceProcess:
        port = free_port()
        prefix = "SITE_" if service == "site" else "AGG_"
        full_env = {
            **os.environ,
            **env,
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}PORT": str(port),
            f"{prefix}TORCH_THREADS": str(self.torch_threads),
            "OMP_NUM_THREADS": str(self.torch_threads),
            "MKL_NUM_THREADS": str(self.torch_threads),
            "PYTHONUNBUFFERED": "1",
        }
        log_path = self.workdir / "logs" / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - handed to the child; closed when it exits
        process = subprocess.Popen(
            [self.python, "-m", "splitunet", "serve", service],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        proc = ServiceProcess(name=name, url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        self.processes.append(proc)
        self._write_manifest()
        logger.info("started %s (pid %d) on %s", name, process.pid, proc.url)
        return proc

    def _write_manifest(self) -> None:
        """``workdir/services.json``: name, pid, URL and log of every process started (for operators and tests)."""
        doc = [{"name": p.name, "pid": p.process.pid, "url": p.url, "log": str(p.log_path)} for p in self.processes]
        (self.workdir / "services.json").write_text(json.dumps(doc, indent=2))

    def start_site(self, name: str, modalities: list[str], data_dir: Path, *, device: str = "cpu") -> ServiceProcess:
        env = {
            "SITE_SITE_ID": name,
            "SITE_MODALITIES": ",".join(modalities),
            "SITE_DATA_DIR": str(data_dir),
            "SITE_STATE_DIR": str(self.workdir / "state" / f"site-{name}"),
            "SITE_AUTH_TOKEN_FILE": str(self.site_token_file),
            "SITE_DEVICE": device,
            "SITE_LOG_LEVEL": "warning",
        }
        return self._start(f"site-{name}", "site", env)

    def start_aggregator(self, data_dir: Path, *, device: str = "cpu") -> ServiceProcess:
        env = {
            "AGG_DATA_DIR": str(data_dir),
            "AGG_STATE_DIR": str(self.workdir / "state" / "aggregator"),
            "AGG_AUTH_TOKEN_FILE": str(self.aggregator_token_file),
            "AGG_DEVICE": device,
            "AGG_LOG_LEVEL": "info",
            # the traffic transcript is on in local federations (the demo): the audit replays it
            "AGG_TRANSCRIPT__ENABLED": os.environ.get("AGG_TRANSCRIPT__ENABLED", "true"),
            "AGG_TRANSCRIPT__DIR": os.environ.get("AGG_TRANSCRIPT__DIR", str(self.workdir / "transcripts")),
        }
        return self._start("aggregator", "aggregator", env)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until every service answers ``/readyz`` with 200; raise with the log tail of a failed one."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.processes)
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for proc in list(pending):
                    code = proc.process.poll()
                    if code is not None:
                        raise RuntimeError(f"{proc.name} exited with code {code} during start-up:\n{proc.log_tail()}")
                    try:
                        if client.get(f"{proc.url}/readyz").status_code == 200:
                            pending.remove(proc)
                    except httpx.TransportError:
                        pass
                if pending and time.monotonic() > deadline:
                    names = ", ".join(p.name for p in pending)
                    raise TimeoutError(f"not ready after {timeout_s:.0f} s: {names}\n{pending[0].log_tail()}")
                if pending:
                    time.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate every process group (SIGTERM, then SIGKILL after ``timeout_s``); idempotent."""
        for proc in self.processes:
            if proc.process.poll() is None:
                _signal_group(proc.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", proc.name)
                _signal_group(proc.process, signal.SIGKILL)
                proc.process.wait(timeout=5)
        for proc in self.processes:  # children left in a group (none expected) are killed too
            _signal_group(proc.process, signal.SIGKILL)

    def pids(self) -> list[int]:
        return [p.process.pid for p in self.processes]


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
