"""Run the workloads of a rendered overlay as local processes with exactly the environment and files they get.

For each container: its environment (ConfigMaps via ``envFrom``, then ``env``), its mounted Secrets and
ConfigMaps written as files, its volumes mapped to local folders (a PersistentVolumeClaim is one folder shared by
every pod that mounts it, as on one node), and three rewrites that a single machine forces:

- a path under a ``mountPath`` becomes the same path under that volume's local folder (its ``subPath`` folder
  when the mount names one);
- ``*_HOST`` becomes ``127.0.0.1`` and ``*_PORT`` a free port (four sites cannot all listen on 8101 here);
- a Service's cluster DNS name (``http://site-t1:8101``) in a value or a mounted file becomes its local
  ``http://127.0.0.1:<port>``.

Nothing else is changed: the settings classes read what the manifests set.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests import Rendered, pod_env

from splitunet.launcher import free_port


@dataclass
class LocalPod:
    """One container of a workload, mapped onto this machine."""

    name: str
    service: str  # the Service that selects it (its DNS name), or "" for a Job
    args: list[str]
    env: dict[str, str]
    mounts: dict[str, Path]  # mountPath -> local folder
    port: int | None = None
    process: subprocess.Popen | None = None
    log: Path | None = None
    files: list[Path] = field(default_factory=list)
    explicit: set[str] = field(default_factory=set)  # the container's own ``env`` (wins over any ConfigMap)
    optional: list[str] = field(default_factory=list)  # optional ConfigMaps of ``envFrom`` an operator creates

    def local_path(self, path: str) -> str:
        """``path`` inside the container -> the local path (unchanged when no volume holds it)."""
        for mount, local in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if path == mount or path.startswith(mount.rstrip("/") + "/"):
                return str(local / path[len(mount):].lstrip("/"))
        return path


class LocalCluster:
    """The workloads of one rendered overlay, as local folders and processes under ``root``."""

    def __init__(self, rendered: Rendered, root: Path) -> None:
        self.rendered = rendered
        self.root = root
        self.pods: dict[str, LocalPod] = {}
        self._claims: dict[str, Path] = {}
        services = {}
        for svc in rendered.of_kind("Service"):
            services[svc["metadata"]["name"]] = svc
        for workload, template in rendered.pod_templates():
            name = workload["metadata"]["name"]
            container = template["spec"]["containers"][0]
            service = next(
                (s for s, spec in services.items()
                 if all(template["metadata"]["labels"].get(k) == v for k, v in spec["spec"]["selector"].items())),
                "",
            )
            pod = LocalPod(name=name, service=service, args=list(container.get("command", [])) +
                           list(container.get("args", [])), env=pod_env(rendered, container), mounts={},
                           explicit={e["name"] for e in container.get("env", [])},
                           optional=[s["configMapRef"]["name"] for s in container.get("envFrom", [])
                                     if s.get("configMapRef", {}).get("optional")])
            self._mount(pod, workload, template, container)
            self.pods[name] = pod
        for pod in self.pods.values():
            if pod.service:
                pod.port = free_port()
        for pod in self.pods.values():
            self._rewrite(pod)

    # ------------------------------------------------------------------ volumes
    def _mount(self, pod: LocalPod, workload: dict, template: dict, container: dict) -> None:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for mount in container.get("volumeMounts", []):
            vname, path = mount["name"], mount["mountPath"]
            volume = volumes.get(vname)
            if vname in claim_templates:  # a StatefulSet's own claim: <template>-<pod>
                local = self._claim(f"{vname}-{pod.name}-0")
            elif volume is None:
                raise AssertionError(f"{pod.name}: mount {vname} has no volume")
            elif "persistentVolumeClaim" in volume:
                local = self._claim(volume["persistentVolumeClaim"]["claimName"])
            elif "secret" in volume:
                local = self.root / "pods" / pod.name / vname
                secret = self.rendered.get("Secret", volume["secret"]["secretName"])
                self._write(pod, local, {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()})
            elif "configMap" in volume:
                local = self.root / "pods" / pod.name / vname
                cm = self.rendered.get("ConfigMap", volume["configMap"]["name"])
                self._write(pod, local, {k: v.encode() for k, v in cm.get("data", {}).items()})
            elif "emptyDir" in volume:
                local = self.root / "pods" / pod.name / vname
                local.mkdir(parents=True, exist_ok=True)
            else:
                raise AssertionError(f"{pod.name}: volume {vname} of an unsupported type")
            if mount.get("subPath"):  # as the kubelet does: that folder of the volume, created if missing
                local = local / mount["subPath"]
                local.mkdir(parents=True, exist_ok=True)
            pod.mounts[path] = local

    def _claim(self, name: str) -> Path:
        if name not in self._claims:
            self._claims[name] = self.root / "volumes" / name
            self._claims[name].mkdir(parents=True, exist_ok=True)
        return self._claims[name]

    def claim(self, name: str) -> Path:
        """The local folder of a PersistentVolumeClaim."""
        return self._claim(name)

    @staticmethod
    def _write(pod: LocalPod, folder: Path, files: dict[str, bytes]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for key, data in files.items():
            (folder / key).write_bytes(data)
            os.chmod(folder / key, 0o600)
            pod.files.append(folder / key)

    # ------------------------------------------------------------------ rewrites
    def url_map(self) -> dict[str, str]:
        """``http(s)://<service>:<port>`` -> ``http(s)://127.0.0.1:<local port>`` for every Service."""
        out = {}
        for pod in self.pods.values():
            if not pod.service:
                continue
            svc = self.rendered.get("Service", pod.service)
            for port in svc["spec"]["ports"]:
                for host in (pod.service, f"{pod.service}.{svc['metadata'].get('namespace', '')}.svc"):
                    out[f"{host}:{port['port']}"] = f"127.0.0.1:{pod.port}"
        return out

    def _rewrite_text(self, text: str) -> str:
        for remote, local in sorted(self.url_map().items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<=://){re.escape(remote)}\b", local, text)
        return text

    def _rewrite(self, pod: LocalPod) -> None:
        for key, value in list(pod.env.items()):
            if key.endswith("_HOST"):
                pod.env[key] = "127.0.0.1"
            elif key.endswith("_PORT") and pod.port is not None:
                pod.env[key] = str(pod.port)
            elif value.startswith("/"):
                pod.env[key] = pod.local_path(value)
            else:
                pod.env[key] = self._rewrite_text(value)
        for path in pod.files:  # mounted files may name services (a site registry) or container paths
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            new = self._paths(pod, self._rewrite_text(text))
            if new != text:
                path.write_text(new)

    # ------------------------------------------------------------------ processes
    def run_job(self, name: str, *, replace: dict[str, str] | None = None,
                configmaps: dict[str, dict[str, str]] | None = None, timeout: float = 600) -> str:
        """Run a Job's (or a CronJob's Job template's) container command to completion with its mounts mapped;
        return its output. ``configmaps``: the optional ConfigMaps an operator created before the Job
        (``kubectl create configmap``), whose data enters the environment as ``envFrom`` says."""
        pod = self.pods[name]
        args = [self._paths(pod, a) for a in pod.args]
        for old, new in (replace or {}).items():
            args = [a.replace(old, new) for a in args]
        created = {}
        for cm, data in (configmaps or {}).items():
            assert cm in pod.optional, f"{name} reads no optional ConfigMap {cm!r} (it reads {pod.optional})"
            created.update({k: v for k, v in data.items() if k not in pod.explicit})
        bin_dir = str(Path(sys.executable).parent)
        env = {**_clean_environ(), **pod.env, **created, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"job {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    @staticmethod
    def _paths(pod: LocalPod, text: str) -> str:
        """Every container path in ``text`` under a mount -> its local path (one pass, longest mount first)."""
        if not pod.mounts:
            return text
        mounts = sorted(pod.mounts, key=len, reverse=True)
        pattern = re.compile(r"(?<![\w/])(" + "|".join(re.escape(m.rstrip("/")) for m in mounts) + r")(?=/|\b|$)")
        return pattern.sub(lambda m: str(pod.mounts[m.group(1)] if m.group(1) in pod.mounts
                                         else pod.mounts[m.group(1) + "/"]), text)

    def start(self, name: str) -> LocalPod:
        """Start a service container (``splitunet serve <args>``) as a local process in its own group."""
        pod = self.pods[name]
        pod.log = self.root / "logs" / f"{name}.log"
        pod.log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "splitunet", "serve", *pod.args]
        with open(pod.log, "wb") as log:
            pod.process = subprocess.Popen(
                command, env={**_clean_environ(), **pod.env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return pod

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.pods[name].port}"

    def stop(self) -> None:
        for pod in self.pods.values():
            if pod.process is not None and pod.process.poll() is None:
                os.killpg(pod.process.pid, signal.SIGTERM)
        for pod in self.pods.values():
            if pod.process is not None:
                try:
                    pod.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(pod.process.pid, signal.SIGKILL)
                    pod.process.wait(timeout=5)

    def log_tail(self, name: str, lines: int = 40) -> str:
        pod = self.pods[name]
        if pod.log is None or not pod.log.is_file():
            return ""
        return "\n".join(pod.log.read_text(errors="replace").splitlines()[-lines:])


def _clean_environ() -> dict[str, str]:
    """This process's environment without any service configuration (only the manifests' may apply)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SITE_", "AGG_", "AUDIT_"))}


def secret_value(cluster: LocalCluster, secret: str, key: str) -> str:
    data: dict[str, Any] = cluster.rendered.get("Secret", secret).get("data", {})
    return base64.b64decode(data[key]).decode().strip()
