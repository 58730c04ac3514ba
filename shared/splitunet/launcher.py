"""Start and stop a local federation: site and aggregator services as real uvicorn processes on 127.0.0.1.

Used by ``splitunet demo`` and by the end-to-end tests. Each service is a separate process (``python -m splitunet
serve site|aggregator``) configured only through its environment and token files, exactly as in a deployment:
every site gets its own token (scope ``aggregator``), the aggregator gets them all through its site registry
(``AGG_SITES``, written by :meth:`LocalFederation.start_aggregator` from the sites started before it), and the
operator calls the aggregator with the operator token. With ``tls=True`` a throwaway CA issues a server
certificate per service and a client certificate for the aggregator, and the sites require mutual TLS.
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from splitunet.signing import IdentityKey

logger = logging.getLogger(__name__)


@dataclass
class ServiceProcess:
    """A running service: its name, base URL, process and log file."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    service: str = ""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    port: int = 0
    threads: int = 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


#: Environment prefixes of the services' settings: never inherited from the caller's shell.
SERVICE_ENV_PREFIXES = ("SITE_", "AGG_", "AUDIT_")


def service_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the services' settings variables (``SITE_*``, ``AGG_*``, ``AUDIT_*``), so a process
    started here is configured only by what the launcher sets, not by a variable left in the caller's shell."""
    return {k: v for k, v in environ.items() if not k.startswith(SERVICE_ENV_PREFIXES)}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_budget(sites: int, cores: int | None = None) -> tuple[int, int]:
    """``(site threads, aggregator threads)`` for ``sites`` site processes and one aggregator on ``cores`` cores
    (default: this process's usable cores). The sites compute concurrently during the forward and backward
    exchanges and share the cores; the aggregator computes alone in between (fusion, decoder, loss, backward,
    optimizer) and gets every core. One thread each oversubscribes nothing that runs at the same time."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, sites)), max(1, cores)


class LocalFederation:
    """Site and aggregator processes on this machine.

    Args:
        workdir: logs go to ``workdir/logs``, tokens to ``workdir/secrets`` (mode 0600), state to ``workdir/state``.
        torch_threads: intra-op threads per process (keep the total near the number of cores).
        python: the interpreter that runs the services.
        tls: serve every service over HTTPS (sites with mutual TLS) with certificates of a throwaway CA.

    Attributes:
        operator_token: the token of the aggregator's job API (scope ``operator``).
        site_tokens: each site's own token (scope ``aggregator``), by site name.
        ca_file: the throwaway CA's certificate (``tls=True``), to verify the services.
    """

    def __init__(
        self, workdir: Path, *, torch_threads: int = 1, python: str = sys.executable, tls: bool = False
    ) -> None:
        self.workdir = Path(workdir)
        self.torch_threads = torch_threads
        self.python = python
        self.processes: list[ServiceProcess] = []
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.secrets_dir = self.workdir / "secrets"
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        self.operator_token = secrets.token_urlsafe(24)
        self.operator_token_file = self._secret(self.secrets_dir / "operator-token", self.operator_token)
        self.site_tokens: dict[str, str] = {}
        self._identity_keys: dict[str, str] = {}
        self._site_urls: dict[str, str] = {}
        self._ca = None
        self._operator_cert = None
        self.ca_file: Path | None = None
        if tls:
            from splitunet.service.pki import ThrowawayCA

            self._ca = ThrowawayCA(self.secrets_dir / "pki", "federation-ca")
            self.ca_file = self._ca.cert_file

    @property
    def aggregator_token(self) -> str:
        """The operator token (older name, kept for callers of the aggregator's API)."""
        return self.operator_token

    def operator_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator_token}"}

    def _tls_env(self, prefix: str, name: str, *, client_auth: bool) -> dict[str, str]:
        if self._ca is None:
            return {}
        files = self._ca.server(name, hosts=("127.0.0.1", "localhost"))
        env = {f"{prefix}TLS_CERT_FILE": str(files.cert), f"{prefix}TLS_KEY_FILE": str(files.key)}
        if client_auth:
            env |= {f"{prefix}TLS_CA_FILE": str(self._ca.cert_file), f"{prefix}TLS_CLIENT_AUTH": "required"}
        return env

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

    def _start(
        self, name: str, service: str, env: dict[str, str], port: int | None = None, threads: int | None = None
    ) -> ServiceProcess:
        port = port or free_port()
        threads = threads or self.torch_threads
        prefix = {"site": "SITE_", "aggregator": "AGG_", "audit": "AUDIT_"}[service]
        full_env = {
            **service_environment(os.environ),
            **env,
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}PORT": str(port),
            f"{prefix}TORCH_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
        }
        log_path = self.workdir / "logs" / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child; closed when it exits
        process = subprocess.Popen(
            [self.python, "-m", "splitunet", "serve", service],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        scheme = "https" if self._ca is not None else "http"
        proc = ServiceProcess(name=name, url=f"{scheme}://127.0.0.1:{port}", process=process, log_path=log_path,
                              service=service, env=env, port=port, threads=threads)
        self.processes = [p for p in self.processes if p.name != name] + [proc]
        self._write_manifest()
        logger.info("started %s (pid %d) on %s", name, process.pid, proc.url)
        return proc

    def _write_manifest(self) -> None:
        """``workdir/services.json``: name, pid, URL and log of every process started (for operators and tests)."""
        doc = [{"name": p.name, "pid": p.process.pid, "url": p.url, "log": str(p.log_path)} for p in self.processes]
        (self.workdir / "services.json").write_text(json.dumps(doc, indent=2))

    def start_site(
        self, name: str, modalities: list[str], data_dir: Path, *, device: str = "cpu", seed: int | None = None,
        defenses: str | None = None, env: Mapping[str, str] | None = None, torch_threads: int | None = None,
    ) -> ServiceProcess:
        """Start site ``name`` with its own token; ``seed``: ``SITE_SEED`` (default: the site's secret
        randomness); ``defenses``: its ``SITE_DEFENSES`` (a JSON list or a YAML file path); ``env`` adds or
        overrides ``SITE_*`` settings (e.g. its policy); ``torch_threads``: this process's intra-op threads
        (default: the federation's)."""
        token = secrets.token_urlsafe(24)
        self.site_tokens[name] = token
        token_file = self._secret(self.secrets_dir / f"site-{name}-token", token)
        # the audit service's own credential at this site (scope ``audit``), listed in the audit's registry
        audit_file = self._secret(self.secrets_dir / f"site-{name}-audit-token", secrets.token_urlsafe(24))
        # the site's identity key (it signs its transcript heads and secure-sum offers) and the pinned public keys
        # of every site started so far (SITE_PEER_KEYS, read at each key agreement)
        identity = IdentityKey.generate()
        identity_file = self._secret(self.secrets_dir / f"site-{name}-identity.key", identity.seed_hex())
        self._identity_keys[name] = identity.public_key
        peer_keys = self.secrets_dir / "peer-keys.json"
        peer_keys.write_text(json.dumps({"keys": self._identity_keys}, indent=2))
        site_env = {
            "SITE_SITE_ID": name,
            "SITE_MODALITIES": ",".join(modalities),
            "SITE_DATA_DIR": str(data_dir),
            "SITE_STATE_DIR": str(self.workdir / "state" / f"site-{name}"),
            "SITE_AUTH_TOKEN_FILE": str(token_file),
            "SITE_SCOPE_TOKEN_FILES__AUDIT": str(audit_file),
            "SITE_IDENTITY_KEY_FILE": str(identity_file),
            "SITE_PEER_KEYS": str(peer_keys),
            "SITE_DEVICE": device,
            "SITE_LOG_LEVEL": "warning",
            **self._tls_env("SITE_", f"site-{name}", client_auth=True),
            **({} if seed is None else {"SITE_SEED": str(seed)}),
            **dict(env or {}),
        }
        if defenses:
            site_env["SITE_DEFENSES"] = defenses
        proc = self._start(f"site-{name}", "site", site_env, threads=torch_threads)
        self._site_urls[name] = proc.url
        return proc

    def write_registry(self) -> Path:
        """``secrets/sites.json``: the aggregator's site registry (name, URL, token file of each site started)."""
        entries = [
            {"name": name, "url": url, "token_file": str(self.secrets_dir / f"site-{name}-token")}
            for name, url in self._site_urls.items()
        ]
        path = self.secrets_dir / "sites.json"
        path.write_text(json.dumps({"sites": entries}, indent=2))
        return path

    def start_aggregator(
        self, data_dir: Path, *, device: str = "cpu", env: Mapping[str, str] | None = None,
        torch_threads: int | None = None,
    ) -> ServiceProcess:
        """Start the aggregator with a registry of the sites started so far (start the sites first); ``env`` adds
        or overrides ``AGG_*`` variables; ``torch_threads``: its intra-op threads (default: the federation's)."""
        if not self._site_urls:
            raise RuntimeError("start the sites first: the aggregator's registry (AGG_SITES) lists them")
        env = {
            "AGG_DATA_DIR": str(data_dir),
            "AGG_SITES": str(self.write_registry()),
            "AGG_STATE_DIR": str(self.workdir / "state" / "aggregator"),
            "AGG_AUTH_TOKEN_FILE": str(self.operator_token_file),
            "AGG_DEVICE": device,
            "AGG_LOG_LEVEL": "info",
            **self._tls_env("AGG_", "aggregator", client_auth=False),
            # the traffic transcript is on in local federations (the demo): the audit replays it
            "AGG_TRANSCRIPT__ENABLED": "true",
            "AGG_TRANSCRIPT__DIR": str(self.workdir / "transcripts"),
        } | dict(env or {})
        if self._ca is not None:
            client = self._ca.client("aggregator-client", "aggregator")
            env |= {
                "AGG_SITE_CA_FILE": str(self._ca.cert_file),
                "AGG_SITE_CLIENT_CERT_FILE": str(client.cert),
                "AGG_SITE_CLIENT_KEY_FILE": str(client.key),
            }
        return self._start("aggregator", "aggregator", env, threads=torch_threads)

    def reconfigure_site(self, name: str, *, defenses: str | None) -> ServiceProcess:
        """Stop site ``name`` and start it again on the same port, token and state folder with other
        ``SITE_DEFENSES`` (``None``: none); the registries stay valid. Wait with :meth:`wait_ready`."""
        proc = self.process(f"site-{name}")
        if proc.process.poll() is None:
            _signal_group(proc.process, signal.SIGTERM)
            try:
                proc.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.process, signal.SIGKILL)
                proc.process.wait(timeout=5)
        env = {k: v for k, v in proc.env.items() if k != "SITE_DEFENSES"}
        if defenses:
            env["SITE_DEFENSES"] = defenses
        return self._start(proc.name, "site", env, port=proc.port)

    def start_audit(
        self, *, labels_dir: Path | None = None, lab_images_dir: Path | None = None,
        lab_labels_dir: Path | None = None, env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        """Start the central audit service on the aggregator's transcripts with its own registry of the sites
        started so far (its own token at each site, scope ``audit``: one per site); the operator token calls its
        API. ``labels_dir``: the aggregator's segmentations, for its label-leakage audit. ``lab_images_dir`` (and
        ``lab_labels_dir``) enable lab mode (phantom: the audit reads the cohort and draws reconstructions)."""
        if not self._site_urls:
            raise RuntimeError("start the sites first: the audit's registry (AUDIT_SITES) lists them")
        entries = [
            {"name": name, "url": url, "token_file": str(self.secrets_dir / f"site-{name}-audit-token")}
            for name, url in self._site_urls.items()
        ]
        registry = self.secrets_dir / "audit-sites.json"
        registry.write_text(json.dumps({"sites": entries}, indent=2))
        (self.workdir / "transcripts").mkdir(parents=True, exist_ok=True)
        audit_env = {
            "AUDIT_TRANSCRIPTS_DIR": str(self.workdir / "transcripts"),
            "AUDIT_SITES": str(registry),
            "AUDIT_AUTH_TOKEN_FILE": str(self.operator_token_file),
            "AUDIT_LOG_LEVEL": "info",
            **self._tls_env("AUDIT_", "audit", client_auth=False),
            **({} if labels_dir is None else {"AUDIT_LABELS_DIR": str(labels_dir)}),
            **({} if lab_images_dir is None else {"AUDIT_LAB_IMAGES_DIR": str(lab_images_dir)}),
            **({} if lab_labels_dir is None else {"AUDIT_LAB_LABELS_DIR": str(lab_labels_dir)}),
        }
        if self._ca is not None:
            client = self._ca.client("audit-client", "audit")
            audit_env |= {
                "AUDIT_SITE_CA_FILE": str(self._ca.cert_file),
                "AUDIT_SITE_CLIENT_CERT_FILE": str(client.cert),
                "AUDIT_SITE_CLIENT_KEY_FILE": str(client.key),
            }
        return self._start("audit", "audit", audit_env | dict(env or {}))

    def _verify(self) -> object:
        """TLS verification of the operator's own calls: trust the CA, show the operator's client certificate
        (the sites require one: mutual TLS)."""
        if self._ca is None or self.ca_file is None:
            return True
        from splitunet.service.client import tls_context

        if self._operator_cert is None:
            self._operator_cert = self._ca.client("operator-client", "operator")
        files = self._operator_cert
        return tls_context(ca_file=self.ca_file, cert_file=files.cert, key_file=files.key)

    def client(self, proc: ServiceProcess, timeout_s: float = 60.0) -> httpx.Client:
        """An ``httpx.Client`` for ``proc`` that trusts this federation's CA (with ``tls=True``)."""
        return httpx.Client(base_url=proc.url, timeout=timeout_s, verify=self._verify())

    def process(self, name: str) -> ServiceProcess:
        """The running (or last) process called ``name`` (``site-t1``, ``aggregator``)."""
        for proc in self.processes:
            if proc.name == name:
                return proc
        raise KeyError(f"no service {name!r}; started: {[p.name for p in self.processes]}")

    def kill(self, name: str) -> None:
        """SIGKILL a service's process group (a crash: no shutdown code runs) and reap it."""
        proc = self.process(name)
        _signal_group(proc.process, signal.SIGKILL)
        proc.process.wait(timeout=10)
        logger.info("killed %s (pid %d)", name, proc.process.pid)

    def restart(self, name: str) -> ServiceProcess:
        """Start a stopped or killed service again with the same environment, port and state folder."""
        proc = self.process(name)
        if proc.process.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {proc.process.pid}); kill or stop it first")
        return self._start(proc.name, proc.service, proc.env, port=proc.port, threads=proc.threads or None)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until every service answers ``/readyz`` with 200; raise with the log tail of a failed one."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.processes)
        with httpx.Client(timeout=2.0, verify=self._verify()) as client:
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
