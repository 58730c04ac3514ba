"""The aggregator under faults, in process: a site down for a while, a site restarted mid-run, the aggregator
restarted mid-job (with its latest checkpoint corrupt), and ``POST /v1/jobs/{id}/resume``.

Each faulty job is compared with an uninterrupted job of the same spec on the same site services (another run id):
the final weights of every party must agree and every party must have applied exactly ``steps`` optimizer updates
(Adam's own step count, read from its final checkpoint).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from federation_testkit import (
    AGG_HEADERS,
    SITES,
    checkpoint_weights,
    identity_aligner,
    max_weight_difference,
    peers,
    run_job,
    site_headers,
    wait_for_job,
)
from safetensors.torch import load_file

from services.aggregator.app import create_app as create_aggregator_app
from services.client_site.app import create_app as create_site_app
from splitunet.data.sampling import Sample
from splitunet.errors import PolicyError
from splitunet.protocol import SiteStep
from splitunet.schemas import ForwardRequest

STEPS = 8


class Switch(httpx.BaseTransport):
    """The aggregator's line to one site: can be cut (connection refused), re-plugged to a restarted site, and
    cut automatically when a request matches ``trigger``."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.down = threading.Event()
        self.tripped = threading.Event()
        self.trigger: Callable[[httpx.Request], bool] | None = None
        self.refused = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.trigger is not None and self.trigger(request):
            self.trigger = None
            self.down.set()
            self.tripped.set()
        if self.down.is_set():
            self.refused += 1
            raise httpx.ConnectError("connection refused (site down in the test)", request=request)
        return self.inner.handle_request(request)


def backward_of(run_id: str, step: int) -> Callable[[httpx.Request], bool]:
    return lambda r: r.url.path == f"/v1/runs/{run_id}/backward" and r.url.params.get("step") == str(step)


class Federation:
    """Four in-process sites behind switches and an aggregator that can be restarted over the same state."""

    def __init__(self, stack: ExitStack, site_settings, aggregator_settings) -> None:
        self.stack = stack
        self.site_settings = {m: site_settings(m) for m in SITES}
        self.sites = {m: self._start_site(m) for m in SITES}
        self.switches = {m: Switch(self.sites[m]._transport) for m in SITES}
        self.aggregator_settings = aggregator_settings(site_retry_max_s=0.2, site_wait_s=60)
        self.aggregator = self.start_aggregator()

    def _start_site(self, name: str) -> TestClient:
        return TestClient(create_site_app(self.site_settings[name]), raise_server_exceptions=False).__enter__()

    def start_aggregator(self, **overrides: Any) -> TestClient:
        settings = self.aggregator_settings.model_copy(update=overrides)
        app = create_aggregator_app(settings, aligner=identity_aligner,
                                    transport_factory=lambda peer: self.switches[peer.name])
        return TestClient(app, raise_server_exceptions=False).__enter__()

    def restart_site(self, name: str) -> None:
        self.sites[name].__exit__(None, None, None)
        self.sites[name] = self._start_site(name)
        self.switches[name].inner = self.sites[name]._transport

    def close(self) -> None:
        self.aggregator.__exit__(None, None, None)
        for site in self.sites.values():
            site.__exit__(None, None, None)

    def final_state(self, run_id: str, steps: int) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
        """``party -> (weights, optimizer updates)`` from each party's checkpoint of the last step."""
        job = self.aggregator.app.state.runtime.jobs.get(run_id)
        paths = {"aggregator": job.checkpoint_path(steps)}
        paths |= {m: self.sites[m].app.state.runtime._checkpoint_path(run_id, steps) for m in SITES}
        return {party: (checkpoint_weights(p), int(load_file(str(p))["optim.0.step"])) for party, p in paths.items()}


@pytest.fixture
def federation(site_settings, aggregator_settings) -> Iterator[Federation]:
    with ExitStack() as stack:
        fed = Federation(stack, site_settings, aggregator_settings)
        try:
            yield fed
        finally:
            fed.close()


def spec(run_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "run_id": run_id, "sites": peers(), "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 1},
        "roi": [16, 16], "batch_size": 2, "steps": STEPS, "val_cases": 1, "seed": 11, "checkpoint_interval": 2,
        "site_optimizer": {"lr": 1e-3}, "server_optimizer": {"lr": 1e-3},
        "wire": {"activations": "fp32", "gradients": "fp32"},
    } | overrides


def assert_same_training(fed: Federation, clean: str, faulty: str) -> None:
    want, got = fed.final_state(clean, STEPS), fed.final_state(faulty, STEPS)
    for party, (weights, updates) in got.items():
        assert updates == STEPS, f"{party} applied {updates} updates, not {STEPS}"
        assert max_weight_difference(weights, want[party][0]) <= 1e-6, party


def start(client: TestClient, doc: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=doc, headers=AGG_HEADERS)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_a_site_down_for_a_while_makes_the_job_wait_and_then_continue_from_a_sound_checkpoint(
    federation: Federation,
) -> None:
    fed = federation
    assert run_job(fed.aggregator, spec("clean"))["state"] == "succeeded"
    switch = fed.switches["t2"]
    switch.trigger = backward_of("faulty", 5)  # t2 goes away just before the backward of step 5 reaches it
    start(fed.aggregator, spec("faulty"))
    assert switch.tripped.wait(60)
    waiting = wait_for_job(fed.aggregator, "faulty", ("waiting_for_site",), timeout_s=30)
    assert waiting["waiting_for"] == ["t2"], waiting
    time.sleep(1.5)  # down for a while: the job probes with backoff, it does not spin
    refused = switch.refused
    assert refused <= 20, f"{refused} requests to a down site in ~1.5 s: a hot loop"
    latest = fed.sites["t2"].app.state.runtime._checkpoint_path("faulty", 4)
    latest.write_bytes(latest.read_bytes()[:-100])  # and its newest checkpoint got truncated meanwhile
    switch.down.clear()
    status = wait_for_job(fed.aggregator, "faulty", timeout_s=120)
    assert status["state"] == "succeeded", status
    assert status["recoveries"] == 1 and status["resumed_from_step"] == 2, status  # the step before it
    [error] = status["checkpoint_errors"]
    assert error.startswith("step 4:") and "bad_data" in error, error
    assert len(status["losses"]) == STEPS
    assert_same_training(fed, "clean", "faulty")


def test_a_site_restarted_mid_run_is_restored_when_the_aggregator_asks(federation: Federation) -> None:
    fed = federation
    assert run_job(fed.aggregator, spec("clean"))["state"] == "succeeded"
    switch = fed.switches["t1ce"]
    switch.trigger = backward_of("faulty", 3)  # t1ce dies holding the forward of step 3
    start(fed.aggregator, spec("faulty"))
    assert switch.tripped.wait(60)
    fed.restart_site("t1ce")  # a new site process over the same state folder: the run is back from its store
    info = fed.sites["t1ce"].get("/v1/info", headers=site_headers("t1ce")).json()
    assert info["runs"]["faulty"]["restore_required"] is True
    switch.down.clear()
    status = wait_for_job(fed.aggregator, "faulty", timeout_s=120)
    assert status["state"] == "succeeded", status
    assert status["resumed_from_step"] == 2, status
    assert_same_training(fed, "clean", "faulty")


def test_a_secure_sum_site_restarted_mid_run_agrees_new_keys_and_trains_on(federation: Federation) -> None:
    """A restarted site has lost its secure-sum key pair: the recovery agrees the pairwise keys again, so the
    masks cancel and the job ends where an uninterrupted one does (the fixed-point sum is exact)."""
    fed = federation
    secure = {"model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 1, "fusion": "sum"},
              "secure_sum": {"clip_range": 64.0}}
    assert run_job(fed.aggregator, spec("clean", **secure))["state"] == "succeeded"
    switch = fed.switches["t2"]
    switch.trigger = backward_of("faulty", 3)
    start(fed.aggregator, spec("faulty", **secure))
    assert switch.tripped.wait(60)
    fed.restart_site("t2")
    # the restarted site remembers that the run agreed on secure sum: without new keys it refuses to release plain
    # features (never a silent downgrade)
    request = ForwardRequest(step=3, samples=[Sample(case_id="c", start=(0, 0), size=(16, 16), axial_index=0,
                                                     volume_shape=(16, 16, 4))])
    with pytest.raises(PolicyError, match="keys were lost"):
        fed.sites["t2"].app.state.runtime.protection.outbound("faulty", request, {"f": torch.zeros(2)})
    switch.down.clear()
    status = wait_for_job(fed.aggregator, "faulty", timeout_s=120)
    assert status["state"] == "succeeded", status
    assert status["resumed_from_step"] == 2 and status["defenses"]["secure_sum"] is True, status
    assert_same_training(fed, "clean", "faulty")


def test_an_aggregator_restarted_mid_job_resumes_and_skips_a_corrupt_latest_checkpoint(
    federation: Federation,
) -> None:
    fed = federation
    assert run_job(fed.aggregator, spec("clean"))["state"] == "succeeded"
    switch = fed.switches["t1"]
    switch.trigger = backward_of("faulty", 6)  # hold the job at step 6 ...
    start(fed.aggregator, spec("faulty"))
    assert switch.tripped.wait(60)
    wait_for_job(fed.aggregator, "faulty", ("waiting_for_site",), timeout_s=30)
    fed.aggregator.__exit__(None, None, None)  # ... and shut the aggregator down there
    switch.down.clear()
    state_dir = fed.aggregator_settings.state_dir / "faulty"
    latest = state_dir / "aggregator-step-00000004.safetensors"
    data = bytearray(latest.read_bytes())
    data[-1] ^= 0x01
    latest.write_bytes(bytes(data))  # the newest complete checkpoint is now corrupt

    fed.aggregator = fed.start_aggregator()  # the new process lists the job and resumes it by itself
    status = wait_for_job(fed.aggregator, "faulty", timeout_s=120)
    assert status["state"] == "succeeded", status
    assert status["resumed_from_step"] == 2, status
    assert len(status["checkpoint_errors"]) == 1 and "step 4" in status["checkpoint_errors"][0], status
    assert len(status["losses"]) == STEPS
    assert_same_training(fed, "clean", "faulty")
    listed = fed.aggregator.get("/v1/jobs", headers=AGG_HEADERS).json()
    assert {j["job_id"]: j["state"] for j in listed} == {"clean": "succeeded", "faulty": "succeeded"}


def test_resume_restarts_a_job_that_gave_up_waiting(federation: Federation) -> None:
    fed = federation
    assert run_job(fed.aggregator, spec("clean"))["state"] == "succeeded"
    fed.aggregator.__exit__(None, None, None)
    fed.aggregator = fed.start_aggregator(site_wait_s=0.5)
    switch = fed.switches["flair"]
    switch.trigger = backward_of("faulty", 7)
    failed = run_job(fed.aggregator, spec("faulty"))
    assert failed["state"] == "failed" and "flair" in failed["error"]["message"], failed
    assert fed.aggregator.post("/v1/jobs/clean/resume", headers=AGG_HEADERS).status_code == 409  # succeeded

    switch.down.clear()
    response = fed.aggregator.post("/v1/jobs/faulty/resume", headers=AGG_HEADERS)
    assert response.status_code == 200, response.text
    status = wait_for_job(fed.aggregator, "faulty", timeout_s=120)
    assert status["state"] == "succeeded" and status["resumed_from_step"] == 6, status
    assert_same_training(fed, "clean", "faulty")
    missing = fed.aggregator.post("/v1/jobs/nope/resume", headers=AGG_HEADERS)
    assert missing.status_code == 404, missing.text


class TimesOutOnce(httpx.BaseTransport):
    """Delivers the first matching request in the background but tells the client it timed out, so the client's
    retry overlaps the original (which a slowed backward keeps busy)."""

    def __init__(self, inner: httpx.BaseTransport, match: Callable[[httpx.Request], bool]) -> None:
        self.inner, self.match, self.originals = inner, match, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.match is not None and self.match(request):
            self.match = None
            request.read()
            original = threading.Thread(target=self.inner.handle_request, args=(request,))
            original.start()
            self.originals.append(original)
            time.sleep(0.1)
            raise httpx.ReadTimeout("timed out (test)", request=request)
        return self.inner.handle_request(request)


def test_a_backward_retry_overlapping_the_original_does_not_fail_the_job(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = federation
    assert run_job(fed.aggregator, spec("clean"))["state"] == "succeeded"
    original = SiteStep.backward

    def slow_backward(self, gradients, *, step, run_id="local"):
        time.sleep(0.5 if run_id == "faulty" and step == 3 else 0.0)
        return original(self, gradients, step=step, run_id=run_id)

    monkeypatch.setattr(SiteStep, "backward", slow_backward)
    flaky = TimesOutOnce(fed.sites["t2"]._transport, backward_of("faulty", 3))
    fed.switches["t2"].inner = flaky
    status = run_job(fed.aggregator, spec("faulty"))
    assert status["state"] == "succeeded", status
    assert status["recoveries"] == 0, status  # the retry was acknowledged: no roll-back was needed
    assert len(flaky.originals) == 1
    flaky.originals[0].join(10)
    assert_same_training(fed, "clean", "faulty")
