"""Split training over HTTP (fp32 wire, fixed seed) equals the in-process step protocol.

The aggregator service trains through the four site services; the reference replays exactly the samples the job
planned through :class:`splitunet.training.InProcessFederation`, whose parts are seeded per part like the
services' (:mod:`splitunet.networks.factory`). Losses and final weights must agree.

Only the first test reaches into the processes (the job object, the sites' runtimes); the helpers it uses
(``derive_plans``, ``replay_in_process``, ``checkpoint_weights``) need nothing but the job's status and the
parties' checkpoint files, so the same comparison works against real uvicorn processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from federation_testkit import (
    AGG_HEADERS,
    SITE_SEED,
    Cohort,
    checkpoint_weights,
    derive_plans,
    max_weight_difference,
    peers,
    replay_in_process,
    run_job,
    site_specs,
)

from services.aggregator.trainer import TrainingJob
from splitunet.data.layout import discover_cases
from splitunet.data.loader import load_images
from splitunet.federation import FederationSpec
from splitunet.inference import predict_volume
from splitunet.networks import SplitUNet

STEPS = 5
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-6

MODELS = [
    pytest.param({"spatial_dims": 2, "features": [4, 8, 16]}, [16, 16], id="2d-cut0-concat"),
    pytest.param({"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 2, "skips": [1], "fusion": "mean"},
                 [16, 16], id="2d-cut2-skip1-mean"),
    pytest.param({"spatial_dims": 3, "features": [4, 8, 16], "cut_level": 1, "fusion": "sum"}, [16, 16, 16],
                 id="3d-cut1-sum"),
]


def equivalence_spec(model: dict[str, Any], roi: list[int], run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "sites": peers(),
        "model": model,
        "roi": roi,
        "batch_size": 2,
        "steps": STEPS,
        "val_cases": 1,
        "seed": SITE_SEED,  # the sites' SITE_SEED (test kit): the in-process reference seeds every part alike
        "fg_ratio": 0.5,
        "flip_prob": 0.5,
        "site_optimizer": {"lr": 1e-3, "weight_decay": 1e-5},
        "server_optimizer": {"lr": 2e-3, "weight_decay": 1e-5},
        "wire": {"activations": "fp32", "gradients": "fp32"},
    }


@pytest.mark.parametrize(("model", "roi"), MODELS)
def test_http_training_equals_the_in_process_protocol(
    aggregator: TestClient, sites: dict[str, TestClient], cohort: Cohort, tmp_path, monkeypatch, model, roi
) -> None:
    recorded: list[list] = []
    plan = TrainingJob.plan

    def recording_plan(self: TrainingJob, step: int) -> list:
        samples = plan(self, step)
        recorded.append(samples)
        return samples

    monkeypatch.setattr(TrainingJob, "plan", recording_plan)
    body = equivalence_spec(model, roi, "job-eq")
    status = run_job(aggregator, body, headers=AGG_HEADERS)
    assert status["state"] == "succeeded", status
    assert len(recorded) == STEPS
    monkeypatch.undo()

    runtime = aggregator.app.state.runtime
    job = runtime.jobs.get("job-eq")
    spec = FederationSpec.model_validate(body)
    config = spec.model.build(site_specs(spec))
    assert config == job.config

    # the plan can be derived from the status alone (what a test against real processes has)
    train_cases = sorted(set(runtime.labels.cases) - set(status["val_case_ids"]))
    assert train_cases == job.train_cases
    assert derive_plans(spec, runtime.labels, train_cases, STEPS, cohort) == recorded

    losses, reference = replay_in_process(spec, config, recorded, cohort, runtime.labels)

    http_losses = job.status().losses
    assert len(http_losses) == STEPS
    for step, (got, want) in enumerate(zip(http_losses, losses, strict=True), start=1):
        assert abs(got - want) <= LOSS_TOLERANCE, f"step {step}: HTTP loss {got}, in-process {want}"
    assert status["loss"] == http_losses[-1]
    assert losses[0] != losses[-1]  # it trained

    # final weights, in memory ...
    diff = max_weight_difference(job.aggregator.decoder.state_dict(), reference.model.decoder.state_dict())
    assert diff <= WEIGHT_TOLERANCE, f"decoder differs by {diff}"
    for name, client in sites.items():
        encoder = client.app.state.runtime.encoder("job-eq")
        diff = max_weight_difference(encoder.state_dict(), reference.model.encoders[name].state_dict())
        assert diff <= WEIGHT_TOLERANCE, f"encoder {name} differs by {diff}"

    # ... and in the checkpoints every party wrote at the last step
    stored = checkpoint_weights(tmp_path / "aggregator-state" / "job-eq" / f"aggregator-step-{STEPS:08d}.safetensors")
    assert max_weight_difference(stored, reference.model.decoder.state_dict()) <= WEIGHT_TOLERANCE
    for name in sites:
        path = tmp_path / f"site-{name}-state" / "job-eq" / f"site-{name}-step-{STEPS:08d}.safetensors"
        diff = max_weight_difference(checkpoint_weights(path), reference.model.encoders[name].state_dict())
        assert diff <= WEIGHT_TOLERANCE, f"checkpoint of {name} differs by {diff}"


def test_fp16_activations_stay_close_but_are_not_exact(aggregator: TestClient, cohort: Cohort, monkeypatch) -> None:
    """The comparison is sharp enough to see the default fp16 activation wire (a control for the test above)."""
    recorded: list[list] = []
    plan = TrainingJob.plan
    monkeypatch.setattr(TrainingJob, "plan", lambda self, step: recorded.append(plan(self, step)) or recorded[-1])
    body = equivalence_spec({"spatial_dims": 2, "features": [4, 8, 16]}, [16, 16], "job-fp16")
    body["wire"] = {"activations": "fp16", "gradients": "fp32"}
    assert run_job(aggregator, body)["state"] == "succeeded"

    runtime = aggregator.app.state.runtime
    job = runtime.jobs.get("job-fp16")
    spec = FederationSpec.model_validate(body)
    losses, reference = replay_in_process(spec, job.config, recorded, cohort, runtime.labels)
    http_losses = job.status().losses
    assert max(abs(a - b) for a, b in zip(http_losses, losses, strict=True)) < 1e-2
    diff = max_weight_difference(job.aggregator.decoder.state_dict(), reference.model.decoder.state_dict())
    assert diff > 10 * WEIGHT_TOLERANCE


@pytest.mark.parametrize(
    ("model", "roi"),
    [
        pytest.param({"spatial_dims": 2, "features": [4, 8, 16]}, [16, 16], id="2d-windows"),
        pytest.param({"spatial_dims": 2, "features": [4, 8, 16]}, [32, 32], id="2d-roi-larger-than-slice"),
        pytest.param({"spatial_dims": 3, "features": [4, 8, 16], "cut_level": 1}, [16, 16, 16], id="3d-windows"),
        pytest.param({"spatial_dims": 3, "features": [4, 8, 16], "cut_level": 1}, [8, 16, 32],
                     id="3d-roi-larger-in-z"),
    ],
)
def test_whole_case_prediction_through_the_sites_equals_fused_sliding_window(
    aggregator: TestClient, sites: dict[str, TestClient], cohort: Cohort, model, roi
) -> None:
    """Validation and inference: the windows the sites cut (with padding) are the windows MONAI cuts."""
    body = equivalence_spec(model, roi, "job-sw") | {"steps": 1, "batch_size": 3}
    assert run_job(aggregator, body)["state"] == "succeeded"
    job = aggregator.app.state.runtime.jobs.get("job-sw")

    fused = SplitUNet(job.config)
    fused.decoder = job.aggregator.decoder
    for name, client in sites.items():
        fused.encoders[name] = client.app.state.runtime.encoder("job-sw")
    fused.eval()

    case_id = cohort.lps_case
    got = torch.from_numpy(job.predict_case(case_id)[0])
    cases = {s.name: discover_cases(cohort.site_dirs[s.name]) for s in job.config.sites}
    volume = torch.from_numpy(np.concatenate(
        [load_images(cases[s.name][case_id], s.modalities).array for s in job.config.sites]
    ))  # (4, X, Y, Z)
    # the in-process evaluation's whole-volume prediction (splitunet.inference) on the fused model: same windows,
    # same overlap (0.5), same blending
    want = torch.sigmoid(predict_volume(fused, volume, roi, batch_size=3))
    assert got.shape == want.shape == (3, *cohort.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["sync", "delayed"])
def test_bundles_are_encoded_and_decoded_in_the_jobs_own_thread(
    aggregator: TestClient, cohort: Cohort, monkeypatch, schedule: str
) -> None:
    """The pool's threads only move bytes: torch work there would start an OpenMP team per pool thread and slow
    the decoder step down (see services.aggregator.pipeline, "Threads"). Training and validation forwards are
    decoded, and gradients encoded, in the job's thread."""
    import threading

    from services.aggregator import site_client

    where: list[tuple[str, str]] = []

    def traced(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            where.append((name, threading.current_thread().name))
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(site_client, "decode_bundle", traced("decode", site_client.decode_bundle))
    monkeypatch.setattr(site_client, "encode_bundle", traced("encode", site_client.encode_bundle))
    model = {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0}
    body = equivalence_spec(model, [16, 16], f"job-threads-{schedule}") | {
        "steps": 3, "val_interval": 2, "max_val_cases": 1, "step_schedule": schedule}
    status = run_job(aggregator, body, headers=AGG_HEADERS)
    assert status["state"] == "succeeded", status
    assert {name for name, _ in where} == {"decode", "encode"}
    assert {thread for _, thread in where} == {f"job-{body['run_id']}"}
