"""schemathesis against each service's OpenAPI schema, authenticated, with a bounded number of examples: no 5xx,
and every answer conforms to the schema (status code, content type, body)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
import pytest
import schemathesis
from federation_testkit import AGG_HEADERS, SITE_HEADERS, identity_aligner
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.aggregator.app import create_app as create_aggregator_app
from services.client_site.app import create_app as create_site_app

#: Examples per operation (kept small: the two services take well under a minute on the shared 2-core machine).
EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def stop_lifespans():
    yield
    shutdown_lifespans()  # schemathesis keeps the apps it started alive for the process otherwise


def fuzz(app, headers: Mapping[str, str], security) -> tuple[int, int]:
    """Run every operation of ``app``'s schema; return (operations, examples)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=dict(headers))
    operations = examples = server_errors = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            nonlocal examples, server_errors
            response = case.call(headers=dict(headers))
            examples += 1
            server_errors += response.status_code >= 500
            case.validate_response(response, checks=CHECKS)

        run()
    security.fuzzed(examples, operations, server_errors)
    assert server_errors == 0
    return operations, examples


def test_site_api_fuzzed(site_settings, security, stop_lifespans) -> None:
    # a tight policy keeps whatever the fuzzer sets up tiny
    settings_ = site_settings("t1", max_batch_voxels=4096, policy={"max_width": 8, "allowed_spatial_dims": [2]})
    operations, examples = fuzz(create_site_app(settings_), SITE_HEADERS, security)
    assert operations >= 8 and examples >= operations


def test_aggregator_api_fuzzed(aggregator_settings, security, stop_lifespans) -> None:
    # sites that answer nothing useful: a job the fuzzer manages to create fails at once instead of training
    dead = httpx.MockTransport(lambda request: httpx.Response(404, json={"code": "not_found", "message": "x"}))
    app = create_aggregator_app(aggregator_settings(), aligner=identity_aligner, transport_factory=lambda peer: dead)
    operations, examples = fuzz(app, AGG_HEADERS, security)
    assert operations >= 5 and examples >= operations
