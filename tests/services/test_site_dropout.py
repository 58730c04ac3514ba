"""Site dropout in a job, in process: the sites left out of a step are not asked to forward and get no gradient;
the job spec refuses what cannot train without a site; the model card lists the subsets trained on."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from federation_testkit import AGG_HEADERS, SITES, identity_aligner, peers, run_job
from pydantic import ValidationError
from safetensors.torch import load_file

from services.aggregator.app import create_app as create_aggregator_app
from services.aggregator.attendance import SiteAttendance
from splitunet.dropout import dropped_sites
from splitunet.federation import FederationSpec, MissingSitePolicy

STEPS = 12
INTERVAL = 4
RATE = 0.5
SEED = 7
SUM = {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 1, "fusion": "sum"}


class Counting(httpx.BaseTransport):
    """Counts the training forwards and the backwards a site receives."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/backward"):
            self.calls["backward"] += 1
        elif request.url.path.endswith("/forward") and b'"phase":"train"' in request.read().replace(b" ", b""):
            self.calls["forward"] += 1
        return self.inner.handle_request(request)


def spec(**overrides: Any) -> dict[str, Any]:
    return {
        "run_id": "dropout", "sites": peers(), "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 1},
        "roi": [16, 16], "batch_size": 2, "steps": STEPS, "val_cases": 1, "seed": SEED,
        "checkpoint_interval": INTERVAL, "site_dropout": RATE,
        "site_optimizer": {"lr": 1e-3}, "server_optimizer": {"lr": 1e-3},
    } | overrides


def test_sites_left_out_are_not_asked_to_forward_and_get_no_gradient(
    start_app, aggregator_settings, sites, site_settings
) -> None:
    counters = {name: Counting(client._transport) for name, client in sites.items()}
    app = create_aggregator_app(aggregator_settings(), aligner=identity_aligner,
                                transport_factory=lambda peer: counters[peer.name])
    client: TestClient = start_app(app)
    status = run_job(client, spec())
    assert status["state"] == "succeeded", status

    # every site takes part in a step that checkpoints (4, 8, 12); the others follow the seeded draw
    taking_part = {name: 0 for name in SITES}
    subsets: Counter[tuple[str, ...]] = Counter()
    for step in range(1, STEPS + 1):
        left_out = [] if step % INTERVAL == 0 else dropped_sites(list(SITES), RATE, SEED, step)
        present = tuple(s for s in SITES if s not in left_out)
        subsets[present] += 1
        for name in present:
            taking_part[name] += 1
    assert len(subsets) > 2 and min(taking_part.values()) < STEPS, subsets  # the draw did leave sites out
    for name in SITES:
        assert counters[name].calls == {"forward": taking_part[name], "backward": taking_part[name]}, name
        path = site_settings(name).state_dir / "dropout" / f"site-{name}-step-{STEPS:08d}.safetensors"
        adam = max(int(v) for k, v in load_file(str(path)).items() if k.endswith(".step"))
        assert adam == taking_part[name], name  # no gradient, no update, for a step the site was left out of

    card = status["model_card"]
    assert {tuple(s["sites"]): s["steps"] for s in card["trained_subsets"]} == dict(subsets)
    assert card["site_dropout"] == RATE and card["trained_for_absence"] is True
    assert card["absent_sites"] == "learned per-site embedding"
    assert status["attendance"]["missed_steps"] == {}  # dropout is not a miss


@pytest.mark.parametrize(("overrides", "message"), [
    ({"secure_sum": {"clip_range": 64.0}, "model": SUM, "wire": {"activations": "fp32"},
      "missing_site_policy": "continue"}, "re-agreeing them for a smaller set is not implemented"),
    ({"secure_sum": {"clip_range": 64.0}, "model": SUM, "wire": {"activations": "fp32"},
      "site_dropout": 0.2}, "masks cancel only over the full set"),
    ({"step_schedule": "delayed", "site_dropout": 0.2}, "needs step_schedule='sync'"),
    ({"sites": ["t1"], "missing_site_policy": "continue"}, "at least 2 sites"),
    ({"site_dropout": 1.0}, "less than 1"),
])
def test_the_spec_refuses_what_cannot_train_without_a_site(aggregator: TestClient, overrides, message) -> None:
    doc = spec(**overrides)
    with pytest.raises(ValidationError, match=message):
        FederationSpec.model_validate(doc)
    response = aggregator.post("/v1/jobs", json=doc, headers=AGG_HEADERS)
    assert response.status_code == 422 and message in response.text, response.text


def test_wait_stays_the_default_and_trains_every_site_every_step() -> None:
    plain = FederationSpec.model_validate({"sites": ["a", "b"]})
    assert plain.missing_site_policy == MissingSitePolicy.WAIT and plain.site_dropout == 0
    assert not plain.trains_for_absence
    attendance = SiteAttendance(["a", "b", "c"])
    assert all(attendance.participants(step) == ["a", "b", "c"] for step in range(1, 50))


def test_dropout_never_leaves_out_every_site() -> None:
    for step in range(1, 2000):
        assert len(dropped_sites(["a", "b", "c", "d"], 0.95, 0, step)) <= 3
    rate = sum(len(dropped_sites(["a", "b", "c", "d"], 0.25, 1, s)) for s in range(1, 4001)) / (4 * 4000)
    assert abs(rate - 0.25) < 0.02, rate


class Hangs(httpx.BaseTransport):
    """A site that stops answering its forwards in time once ``hung`` is set (the client sees a read timeout)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.hung = inner, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.hung and request.url.path.endswith("/forward"):
            raise httpx.ReadTimeout("no answer within the read timeout (test)", request=request)
        return self.inner.handle_request(request)


def test_inference_goes_on_without_a_site_that_times_out(start_app, aggregator_settings, sites) -> None:
    lines = {name: Hangs(client._transport) for name, client in sites.items()}
    app = create_aggregator_app(aggregator_settings(site_retry_max_s=0.05), aligner=identity_aligner,
                                transport_factory=lambda peer: lines[peer.name])
    client: TestClient = start_app(app)
    status = run_job(client, spec(steps=2, site_dropout=0.0, checkpoint_interval=0))  # a model never trained
    assert status["state"] == "succeeded", status                                      # for absence
    assert status["model_card"]["trained_subsets"] == [{"sites": list(SITES), "steps": 2}]
    assert status["model_card"]["absent_sites"] == "zeros" and not status["model_card"]["trained_for_absence"]
    lines["t2"].hung = True
    case = status["val_case_ids"][0]
    answer = client.post("/v1/infer", json={"case_id": case, "job_id": "dropout"}, headers=AGG_HEADERS)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-sites-used"] == "t1,t1ce,flair"
    for line in lines.values():
        line.hung = True
    none = client.post("/v1/infer", json={"case_id": case, "job_id": "dropout"}, headers=AGG_HEADERS)
    assert none.status_code == 502 and "t1" in none.text, none.text  # no site answered: an error, not a guess
