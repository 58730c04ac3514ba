"""The hostile inputs of issue 22, reproduced against the in-process services: each is refused with a typed 4xx
naming what was wrong (never a 500), and the leaks it found stay closed."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from federation_testkit import SITE_HEADERS, align_site, model_config

from services.client_site.app import create_app as create_site_app
from splitunet.schemas import RunSetup

RUN = "run-h"


def setup_body(run_id: str = RUN, **model: Any) -> dict[str, Any]:
    body = RunSetup(run_id=run_id, model=model_config(cut_level=1)).model_dump(mode="json")
    body["model"].update(model)
    return body


def started(start_app, site_settings, **overrides: Any) -> TestClient:
    client = start_app(create_site_app(site_settings("t1", **overrides)))
    assert align_site(client, client.app.state.runtime.case_ids()).status_code == 200
    return client


# ---------------------------------------------------------------------------------------------- act / norm specs
@pytest.mark.parametrize("field, spec, says", [
    ("act", ["LeakyReLU", {"bogus": 1}], "bogus"),
    ("act", ["nonexistent", {}], "not supported"),
    ("act", "relu", "pair"),
    ("act", ["LeakyReLU", {"negative_slope": "x"}], "negative_slope"),
    ("norm", ["group", {"num_groups": 3}], "num_groups"),
    ("norm", ["layer", {}], "not supported"),
    ("norm", ["instance", {"affine": "yes"}], "affine"),
])
def test_bad_layer_specs_are_422_naming_the_field(start_app, site_settings, security, field, spec, says) -> None:
    client = started(start_app, site_settings)
    response = client.post("/v1/runs", json=setup_body(**{field: spec}), headers=SITE_HEADERS)
    security.refused("bad_layer_spec", response.status_code, expected=422)
    assert response.json()["code"] == "invalid_request" and says in response.json()["message"], response.text


@pytest.mark.parametrize("spec, rule", [
    (["LeakyReLU", {"negative_slope": 0.99}], "max_negative_slope"),
    (["LeakyReLU", {"negative_slope": 0.5}], "max_negative_slope"),
    (["gelu", {}], "activations"),
])
def test_the_site_policy_names_the_activations_it_accepts(start_app, site_settings, security, spec, rule) -> None:
    client = started(start_app, site_settings)
    response = client.post("/v1/runs", json=setup_body(act=spec), headers=SITE_HEADERS)
    security.refused("policy_activation", response.status_code, expected=403)
    assert response.json()["detail"]["rule"] == rule, response.text


def test_an_affine_activation_is_refused_and_the_fingerprint_covers_the_layers(start_app, site_settings,
                                                                                 security) -> None:
    client = started(start_app, site_settings)
    # slope 1 is the identity: the encoder would be affine, its activations invertible by least squares
    affine = client.post("/v1/runs", json=setup_body(act=["LeakyReLU", {"negative_slope": 1}]), headers=SITE_HEADERS)
    security.refused("policy_activation", affine.status_code, expected=422)
    prints = []
    for run, act in (("run-a", ["LeakyReLU", {"negative_slope": 0.1}]), ("run-b", ["relu", {}]),
                     ("run-c", ["LeakyReLU", {"negative_slope": 0.2}])):
        response = client.post("/v1/runs", json=setup_body(run, act=act), headers=SITE_HEADERS)
        assert response.status_code == 200, response.text
        prints.append(response.json()["fingerprint"])
    assert len(set(prints)) == 3, prints
    # a site whose policy allows a wider set still refuses what is outside the closed set
    wide = started(start_app, site_settings, policy={"activations": ["leakyrelu", "gelu"], "norms": ["instance"]})
    ok = wide.post("/v1/runs", json=setup_body(act=["gelu", {}]), headers=SITE_HEADERS)
    assert ok.status_code == 200, ok.text
