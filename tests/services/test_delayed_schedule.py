"""The one-step-delayed schedule through the services, in process (``step_schedule = delayed``).

The aggregator's pipelined job equals the in-process delayed protocol replayed on the same samples in the
pipeline's order (validations and a checkpoint drain it); a site that fails mid-job is rolled back and the job ends
on exactly the weights of an uninterrupted delayed job; secure sum works under it; a site keeps at most two steps
in flight and says 409 to the rest; sync stays the default.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi.testclient import TestClient
from federation_testkit import (
    AGG_HEADERS,
    SITE_SEED,
    Cohort,
    max_weight_difference,
    peers,
    reference_batch,
    replay_in_process,
    run_job,
    site_specs,
    wait_for_job,
)
from test_aggregator_fault_tolerance import STEPS as FAULT_STEPS
from test_aggregator_fault_tolerance import Federation, assert_same_training, backward_of, start
from test_aggregator_fault_tolerance import spec as fault_spec
from test_defenses_service import federation
from test_defenses_service import job_spec as defended_job_spec
from test_site_service import assert_error, backward, forward, gradients, setup, setup_body

from services.aggregator.trainer import TrainingJob
from splitunet.delayed import DelayedSiteStep
from splitunet.federation import FederationSpec
from splitunet.protocol import SiteStep
from splitunet.schemas import RunSetup, StepSchedule
from splitunet.training import InProcessFederation

STEPS = 5


def delayed_spec(run_id: str, **overrides: Any) -> dict[str, Any]:
    """A tiny fp32 2D job; validation at step 2 and 4 and a checkpoint at step 3 drain the pipeline."""
    return {
        "run_id": run_id, "sites": peers(), "model": {"spatial_dims": 2, "features": [4, 8, 16]}, "roi": [16, 16],
        "batch_size": 2, "steps": STEPS, "val_cases": 1, "val_interval": 2, "checkpoint_interval": 3,
        "max_val_cases": 1, "sw_overlap": 0.0, "seed": SITE_SEED,
        "site_optimizer": {"lr": 1e-3, "weight_decay": 1e-5}, "server_optimizer": {"lr": 2e-3, "weight_decay": 1e-5},
        "wire": {"activations": "fp32", "gradients": "fp32"}, "step_schedule": "delayed",
    } | overrides


def test_a_delayed_job_equals_the_in_process_delayed_protocol(
    aggregator: TestClient, sites: dict[str, TestClient], cohort: Cohort, monkeypatch
) -> None:
    recorded: list[list] = []
    plan = TrainingJob.plan
    monkeypatch.setattr(TrainingJob, "plan", lambda self, step: recorded.append(plan(self, step)) or recorded[-1])
    body = delayed_spec("job-delayed")
    status = run_job(aggregator, body, headers=AGG_HEADERS)
    assert status["state"] == "succeeded", status
    monkeypatch.undo()
    assert len(recorded) == STEPS and status["checkpoint_step"] == STEPS
    assert [v["step"] for v in status["validations"]] == [2, 4, 5]
    assert [t["step"] for t in status["step_times"]] == list(range(1, STEPS + 1))
    assert all(set(t) == {"step", "total", "plan", "forward", "aggregator", "backward"} for t in status["step_times"])
    assert all(math.isfinite(loss) for loss in status["losses"])
    for client in sites.values():
        assert isinstance(client.app.state.runtime._run("job-delayed").step, DelayedSiteStep)

    job = aggregator.app.state.runtime.jobs.get("job-delayed")
    spec = FederationSpec.model_validate(body)
    config = spec.model.build(site_specs(spec))
    labels = aggregator.app.state.runtime.labels
    losses, reference = replay_delayed(spec, config, recorded, cohort, labels, drains={2, 3, 4, STEPS})
    assert status["losses"] == pytest.approx(losses, abs=1e-5)
    assert max_weight_difference(job.aggregator.decoder.state_dict(), reference.model.decoder.state_dict()) <= 1e-6
    for name, client in sites.items():
        encoder = client.app.state.runtime.encoder("job-delayed")
        assert max_weight_difference(encoder.state_dict(), reference.model.encoders[name].state_dict()) <= 1e-6

    # a control: the synchronous replay of the same samples differs where the pipeline ran ahead (steps 2 and 5)
    sync_losses, _ = replay_in_process(spec, config, recorded, cohort, labels)
    assert sync_losses[0] == pytest.approx(losses[0], abs=1e-6)  # step 1 runs on W_0 under both
    assert abs(sync_losses[1] - losses[1]) > 1e-6


def replay_delayed(spec: FederationSpec, config, plans, cohort: Cohort, labels, drains: set[int]):
    """The in-process protocol with every site on :class:`DelayedSiteStep`, in the aggregator's pipeline order:
    the forward of ``t + 1`` before the backward of ``t`` unless ``t`` drains. Returns (losses, federation)."""
    federation = InProcessFederation(
        config, seed=spec.seed, lr_site=spec.site_optimizer.lr, lr_server=spec.server_optimizer.lr,
        weight_decay=spec.site_optimizer.weight_decay, loss=spec.loss,
    )
    sites = {n: DelayedSiteStep(s.encoder, s.optimizer) for n, s in federation.sites.items()}
    batches = [reference_batch(samples, config, cohort, labels) for samples in plans]

    def forward(step: int) -> dict:
        inputs = federation.model.split_inputs(batches[step - 1][0])
        return {name: site.forward(inputs[name], step=step) for name, site in sites.items()}

    losses, ahead = [], None
    for step in range(1, len(plans) + 1):
        sent = ahead or forward(step)
        result = federation.aggregator.step(sent, batches[step - 1][1], step=step)
        ahead = None if step in drains else forward(step + 1)
        for name, site in sites.items():
            site.backward(result.gradients[name], step=step)
        losses.append(result.loss)
    return losses, federation


def test_a_delayed_job_rolled_back_after_a_site_failure_ends_on_the_uninterrupted_weights(
    site_settings, aggregator_settings
) -> None:
    with ExitStack() as stack:
        fed = Federation(stack, site_settings, aggregator_settings)
        try:
            delayed = {"step_schedule": "delayed", "checkpoint_interval": 4}
            assert run_job(fed.aggregator, fault_spec("clean", **delayed))["state"] == "succeeded"
            switch = fed.switches["t2"]
            switch.trigger = backward_of("faulty", 6)  # step 7's forward is in flight at every site by then
            start(fed.aggregator, fault_spec("faulty", **delayed))
            assert switch.tripped.wait(60)
            wait_for_job(fed.aggregator, "faulty", ("waiting_for_site",), timeout_s=30)
            switch.down.clear()
            status = wait_for_job(fed.aggregator, "faulty", timeout_s=120)
            assert status["state"] == "succeeded", status
            assert status["recoveries"] == 1 and status["resumed_from_step"] == 4, status
            assert len(status["losses"]) == FAULT_STEPS
            assert_same_training(fed, "clean", "faulty")
        finally:
            fed.close()


def test_secure_sum_trains_under_the_delayed_schedule(start_app, site_settings, aggregator_settings) -> None:
    aggregator, _ = federation(start_app, site_settings, aggregator_settings, require_secure_sum=True)
    spec = defended_job_spec(model={"spatial_dims": 2, "features": [4, 8, 16], "fusion": "sum"},
                             wire={"activations": "fp32", "gradients": "fp32"}, steps=10, val_interval=0,
                             secure_sum={"clip_range": 64.0}, step_schedule="delayed")
    status = run_job(aggregator, spec, timeout_s=300)
    assert status["state"] == "succeeded", status["error"]
    assert status["defenses"]["secure_sum"] is True
    losses = status["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


# ---------------------------------------------------------------------------------------------- the site's refusals
@pytest.fixture
def delayed_run(site: TestClient) -> TestClient:
    """The t1 site with run ``run-1`` set up under the delayed schedule."""
    response = setup(site, setup_body(step_schedule=StepSchedule.DELAYED))
    assert response.status_code == 200, response.text
    return site


def test_a_site_keeps_two_steps_in_flight_and_refuses_a_third_or_a_backward_out_of_order(
    delayed_run: TestClient, cohort: Cohort
) -> None:
    assert forward(delayed_run, cohort, 1).status_code == 200
    assert forward(delayed_run, cohort, 2).status_code == 200
    third = assert_error(forward(delayed_run, cohort, 3), 409, "out_of_order")
    assert "at most 2 steps in flight" in third["message"] and third["detail"]["in_flight"] == [1, 2]
    assert_error(backward(delayed_run, 2, gradients(2)), 409, "out_of_order")
    assert_error(forward(delayed_run, cohort, 1), 409, "out_of_order")
    assert backward(delayed_run, 1, gradients(1)).json()["applied"] is True
    # a retry of step 1 while step 2 is in flight is acknowledged, not refused
    retry = backward(delayed_run, 1, gradients(1))
    assert retry.status_code == 200 and retry.json()["applied"] is False
    assert_error(backward(delayed_run, 1, gradients(1, seed=5)), 409, "conflict")
    assert forward(delayed_run, cohort, 3).status_code == 200
    assert backward(delayed_run, 2, gradients(2)).json()["applied"] is True
    assert backward(delayed_run, 3, gradients(3)).json()["applied"] is True


def test_sync_stays_the_default(site: TestClient, cohort: Cohort) -> None:
    assert FederationSpec(sites=["t1"]).step_schedule == StepSchedule.SYNC
    assert RunSetup.model_validate(setup_body()).step_schedule == StepSchedule.SYNC
    assert setup(site, setup_body()).status_code == 200
    step = site.app.state.runtime._run("run-1").step
    assert type(step) is SiteStep
    assert forward(site, cohort, 1).status_code == 200
    assert forward(site, cohort, 2).status_code == 200  # sync: a new forward replaces the unanswered one
    assert_error(backward(site, 1, gradients(1)), 409, "out_of_order")


def test_an_unknown_schedule_is_422(aggregator: TestClient) -> None:
    response = aggregator.post("/v1/jobs", json=delayed_spec("job-bad", step_schedule="async"), headers=AGG_HEADERS)
    assert response.status_code == 422, response.text
    assert "step_schedule" in response.text
