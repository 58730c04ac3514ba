"""The site under faults: overlapping backward retries, checkpoints of the step it holds, verified restores."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from federation_testkit import SITE_HEADERS, Cohort, align_site
from test_site_service import RUN, assert_error, backward, encoder_state, forward, gradients, setup_body, train_step

from services.client_site.app import create_app as create_site_app
from splitunet.checkpoint import save_checkpoint
from splitunet.protocol import SiteStep

RETRIES = 5


@pytest.fixture
def run(site: TestClient) -> TestClient:
    """The t1 site aligned on its cohort through PSI (sites serve only an aligned cohort), run ``run-1`` set up."""
    assert align_site(site, site.app.state.runtime.case_ids()).status_code == 200
    response = site.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS)
    assert response.status_code == 200, response.text
    return site


def adam_steps(client: TestClient) -> int:
    """Optimizer updates the run's encoder has received (Adam's own step count)."""
    runtime = client.app.state.runtime
    state = runtime._run(RUN).step.optimizer.state_dict()["state"]
    return int(state[0]["step"]) if state else 0


def test_overlapping_backward_retries_get_the_same_acknowledgement(
    run: TestClient, cohort: Cohort, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow backward and 4 retries of it sent while it runs (a client timing out and retrying): every request is
    acknowledged for the same step, none is a 409, and the update is applied exactly once."""
    original = SiteStep.backward
    started = threading.Event()

    def slow_backward(self, gradients, *, step, run_id="local"):
        started.set()
        time.sleep(0.3)  # the original is still applying when the retries arrive
        return original(self, gradients, step=step, run_id=run_id)

    monkeypatch.setattr(SiteStep, "backward", slow_backward)
    assert forward(run, cohort, 1).status_code == 200
    data = gradients(1)
    with ThreadPoolExecutor(RETRIES) as pool:
        first = pool.submit(backward, run, 1, data)
        assert started.wait(10)
        retries = [pool.submit(backward, run, 1, data) for _ in range(RETRIES - 1)]
        responses = [first.result(), *(r.result() for r in retries)]
    assert [r.status_code for r in responses] == [200] * RETRIES, [r.text for r in responses]
    assert all(r.json()["run_id"] == RUN and r.json()["step"] == 1 for r in responses)
    assert sorted(r.json()["applied"] for r in responses) == [False] * (RETRIES - 1) + [True]
    assert adam_steps(run) == 1

    other = backward(run, 1, gradients(1, seed=5))  # a "retry" with other gradients is not a retry
    assert_error(other, 409, "conflict")
    assert adam_steps(run) == 1


def test_a_checkpoint_is_of_the_step_the_site_holds(run: TestClient, cohort: Cohort) -> None:
    train_step(run, cohort, 1)
    body = assert_error(run.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 5}, headers=SITE_HEADERS),
                        409, "out_of_order")
    assert body["detail"] == {"held_step": 1, "step": 5}
    assert run.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 1}, headers=SITE_HEADERS).status_code == 200


def _checkpoint_file(client: TestClient, step: int) -> Path:
    return client.app.state.runtime._checkpoint_path(RUN, step)


def test_a_corrupt_checkpoint_is_refused_and_the_encoder_is_left_untouched(run: TestClient, cohort: Cohort) -> None:
    train_step(run, cohort, 1)
    assert run.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 1}, headers=SITE_HEADERS).status_code == 200
    train_step(run, cohort, 2, seed=2)
    before = encoder_state(run)
    path = _checkpoint_file(run, 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the weights: the file still parses
    path.write_bytes(bytes(data))

    body = assert_error(run.post(f"/v1/runs/{RUN}/restore", json={"step": 1}, headers=SITE_HEADERS), 422, "bad_data")
    assert "checksum" in body["message"]
    assert all(torch.equal(before[k], v) for k, v in encoder_state(run).items())
    assert run.get("/v1/info", headers=SITE_HEADERS).json()["runs"][RUN]["step"] == 2

    path.write_bytes(b"")  # an empty file (a crash of an older, non-atomic writer) is refused the same way
    assert_error(run.post(f"/v1/runs/{RUN}/restore", json={"step": 1}, headers=SITE_HEADERS), 422, "bad_data")


def test_a_checkpoint_of_another_encoder_is_checked_before_it_is_loaded(run: TestClient, cohort: Cohort) -> None:
    train_step(run, cohort, 1)
    before = encoder_state(run)
    runtime = run.app.state.runtime
    other = runtime._build_run(runtime._run(RUN).setup, cohort=frozenset())  # same shapes, other weights ...
    with torch.no_grad():
        for p in other.step.encoder.parameters():
            p.add_(1.0)
    save_checkpoint(_checkpoint_file(run, 1), other.step.encoder, other.step.optimizer,  # ... another fingerprint
                    {"run_id": RUN, "step": 1}, fingerprint="0123456789abcdef")
    assert_error(run.post(f"/v1/runs/{RUN}/restore", json={"step": 1}, headers=SITE_HEADERS), 409, "conflict")
    assert all(torch.equal(before[k], v) for k, v in encoder_state(run).items())


def test_runs_survive_a_restart_of_the_site(start_app, site_settings, cohort: Cohort) -> None:
    settings = site_settings("t1")
    first = start_app(create_site_app(settings))
    assert align_site(first, first.app.state.runtime.case_ids()).status_code == 200
    assert first.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS).status_code == 200
    train_step(first, cohort, 1)
    assert first.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 1}, headers=SITE_HEADERS).status_code == 200
    train_step(first, cohort, 2, seed=2)
    at_2 = encoder_state(first)

    second = start_app(create_site_app(settings))  # a new process over the same state folder
    assert_error(backward(second, 2, gradients(2)), 409, "out_of_order")
    restored = second.post(f"/v1/runs/{RUN}/restore", json={"step": 1}, headers=SITE_HEADERS)
    assert restored.status_code == 200, restored.text
    train_step(second, cohort, 2, seed=2)  # replaying the lost step lands on the same weights
    assert all(torch.equal(at_2[k], v) for k, v in encoder_state(second).items())
    assert adam_steps(second) == 2
