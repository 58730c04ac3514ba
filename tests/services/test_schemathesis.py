"""schemathesis against each service's OpenAPI schema (site, aggregator, audit), with every credential: none, a
valid token of a scope the route does not take, and the right one; stateful (chained through the schema's
OpenAPI links) with the right one. No 5xx; without a credential every authenticated route answers 401, with the
wrong scope 403; every answer conforms to the schema. Counted per service and credential in the security summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from federation_testkit import AGG_HEADERS, AUDIT_HEADERS, SITE_HEADERS, identity_aligner
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.aggregator.app import create_app as create_aggregator_app
from services.audit.app import create_app as create_audit_app
from services.audit.settings import AuditSettings
from services.client_site.app import create_app as create_site_app
from splitunet.service.scopes import Scope

#: Examples per operation with the right credential, and with a refused one (refused at the gate, before the
#: body: fewer are enough). Kept small: the default run fuzzes three services three ways in about a minute.
EXAMPLES, REFUSED_EXAMPLES, STATEFUL_EXAMPLES = 40, 8, 15
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: A token of a scope the aggregator and the audit service hold but none of their routes take.
STRAY_TOKEN = "stray-scope-token-0123456789abcdef"
AUDIT_OPERATOR = "audit-operator-token-0123456789abcdef"


@dataclass(frozen=True)
class Credential:
    name: str  # "none", "wrong_scope" or "right"
    headers: Mapping[str, str]
    scope: Scope | None


@pytest.fixture
def stop_lifespans():
    yield
    shutdown_lifespans()  # schemathesis keeps the apps it started alive for the process otherwise


#: Routes served without a credential (health, readiness, metrics).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def required_scope(operation, primary: Scope) -> Scope | None:
    """The scope an operation takes: none for the public probes, ``audit`` for a site's audit routes (tag
    ``site-audit``), the service's primary scope otherwise."""
    if operation.path in PUBLIC_PATHS:
        return None
    tags = (operation.definition.raw or {}).get("tags", [])
    return Scope.AUDIT if "site-audit" in tags else primary


def fuzz(app, service: str, credential: Credential, security, examples: int,
         reader: Mapping[str, str]) -> tuple[int, int]:
    """Run every operation of ``app``'s schema (read with the ``reader`` headers) with ``credential``; return
    (operations, examples)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=dict(reader))
    primary = app.state.settings.primary_scope
    tally = {"operations": 0, "examples": 0, "server_errors": 0}
    for result in schema.get_all_operations():
        operation = result.ok()
        tally["operations"] += 1
        needs = required_scope(operation, primary)
        expected = None if needs is None or credential.scope == needs else 401 if credential.scope is None else 403
        run_operation(operation, dict(credential.headers), expected, examples, tally, security)
    security.fuzzed(tally["examples"], tally["operations"], tally["server_errors"], service=service,
                    credential=credential.name)
    assert tally["server_errors"] == 0
    return tally["operations"], tally["examples"]


def run_operation(operation, headers: dict[str, str], expected: int | None, examples: int, tally: dict,
                  security) -> None:
    """``examples`` generated calls of one operation: no 5xx, ``expected`` status if given, schema conformance."""

    @given(case=operation.as_strategy())
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call(headers=headers)
        tally["examples"] += 1
        tally["server_errors"] += response.status_code >= 500
        if expected is not None:
            kind = "unauthenticated" if expected == 401 else "wrong_scope"
            security.refused(kind, response.status_code, expected=expected)
            assert set(response.json()) == {"code", "message", "detail"}
        case.validate_response(response, checks=CHECKS)

    run()


def fuzz_stateful(app, service: str, credential: Credential, security) -> int:
    """Chain operations through the schema's links (e.g. ``POST /v1/jobs`` -> ``GET /v1/jobs/{job_id}``)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=dict(credential.headers))
    counts = {"steps": 0, "server_errors": 0}
    base = schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case):
            return {"headers": dict(credential.headers)}

        def after_call(self, response, case):
            super().after_call(response, case)
            counts["steps"] += 1
            counts["server_errors"] += response.status_code >= 500

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS)

    Workflow.run(settings=settings(max_examples=STATEFUL_EXAMPLES, deadline=None, database=None, derandomize=True,
                                   stateful_step_count=4, suppress_health_check=list(HealthCheck)))
    security.fuzzed(counts["steps"], 0, counts["server_errors"], service=service,
                    credential=f"{credential.name} (stateful)")
    assert counts["server_errors"] == 0
    return counts["steps"]


SITE_CREDENTIALS = (Credential("none", {}, None), Credential("wrong_scope", AUDIT_HEADERS, Scope.AUDIT),
                    Credential("right", SITE_HEADERS, Scope.AGGREGATOR))


@pytest.mark.parametrize("credential", SITE_CREDENTIALS, ids=lambda c: c.name)
def test_site_api_fuzzed(site_settings, security, stop_lifespans, credential) -> None:
    # a tight policy and memory bound keep whatever the fuzzer sets up tiny; the audit routes take the audit
    # token, so the "wrong_scope" credential is the right one there (and the aggregator's is wrong there)
    settings_ = site_settings("t1", max_batch_voxels=4096, max_forward_bytes=64 * 2**20,
                              policy={"max_width": 8, "allowed_spatial_dims": [2]})
    app = create_site_app(settings_)
    examples = REFUSED_EXAMPLES if credential.name == "none" else EXAMPLES
    operations, ran = fuzz(app, "site", credential, security, examples, SITE_HEADERS)
    assert operations >= 8 and ran >= operations
    if credential.name == "right":
        assert fuzz_stateful(app, "site", credential, security) > 0


def dead_sites() -> httpx.MockTransport:
    # sites that answer nothing useful: a job the fuzzer manages to create fails at once instead of training
    return httpx.MockTransport(lambda request: httpx.Response(404, json={"code": "not_found", "message": "x"}))


@pytest.mark.parametrize("credential", [
    Credential("none", {}, None),
    Credential("wrong_scope", {"Authorization": f"Bearer {STRAY_TOKEN}"}, Scope.AUDIT),
    Credential("right", AGG_HEADERS, Scope.OPERATOR),
], ids=lambda c: c.name)
def test_aggregator_api_fuzzed(aggregator_settings, security, stop_lifespans, credential) -> None:
    settings_ = aggregator_settings(scope_tokens={"audit": STRAY_TOKEN}, max_step_bytes=256 * 2**20)
    app = create_aggregator_app(settings_, aligner=identity_aligner, transport_factory=lambda peer: dead_sites())
    examples = EXAMPLES if credential.name == "right" else REFUSED_EXAMPLES
    operations, ran = fuzz(app, "aggregator", credential, security, examples, AGG_HEADERS)
    assert operations >= 5 and ran >= operations
    if credential.name == "right":
        assert fuzz_stateful(app, "aggregator", credential, security) > 0


@pytest.mark.parametrize("credential", [
    Credential("none", {}, None),
    Credential("wrong_scope", {"Authorization": f"Bearer {STRAY_TOKEN}"}, Scope.AGGREGATOR),
    Credential("right", {"Authorization": f"Bearer {AUDIT_OPERATOR}"}, Scope.OPERATOR),
], ids=lambda c: c.name)
def test_audit_api_fuzzed(tmp_path, security, stop_lifespans, credential) -> None:
    # one recorded-run folder (empty: an audit of it fails in its thread, never in a response)
    (tmp_path / "transcripts" / "run-1").mkdir(parents=True)
    settings_ = AuditSettings(transcripts_dir=tmp_path / "transcripts", auth_token=AUDIT_OPERATOR,
                              scope_tokens={"aggregator": STRAY_TOKEN}, lab_images_dir=tmp_path)
    app = create_audit_app(settings_)
    examples = EXAMPLES if credential.name == "right" else REFUSED_EXAMPLES
    operations, ran = fuzz(app, "audit", credential, security, examples, {"Authorization": f"Bearer {AUDIT_OPERATOR}"})
    assert operations >= 4 and ran >= operations
    if credential.name == "right":
        assert fuzz_stateful(app, "audit", credential, security) > 0
