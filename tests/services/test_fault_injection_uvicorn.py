"""Fault injection with real processes: SIGKILL a site, and separately the aggregator, at random (seeded) steps.

Two site services and the aggregator run under uvicorn on 127.0.0.1. The same services first train an
uninterrupted job (the reference: same spec, same site-side settings, another run id), then the faulty job, during
which the test

1. SIGKILLs site ``t1`` at a random step, checks that the job shows ``waiting_for_site`` naming it, and restarts
   the site on the same port over the same state folder (its run comes back from its store);
2. SIGKILLs the aggregator at a later random step and restarts it (it resumes the job from its store by itself).

The job must finish; every party's final checkpoint must hold exactly ``STEPS`` optimizer updates (Adam's own step
count: no step lost, none applied twice on top of itself) and the same fp32 weights as the uninterrupted job.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from federation_testkit import Cohort, checkpoint_weights, max_weight_difference, run_job, wait_for_job
from safetensors.torch import load_file

from splitunet.launcher import LocalFederation

SEED = 20261127
STEPS = 30
SITES = ("t1", "flair")
KILLED_SITE = "t1"


def job_spec(run_id: str, peers: list[str]) -> dict[str, Any]:
    return {
        "run_id": run_id, "sites": peers, "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 1},
        "roi": [16, 16], "batch_size": 2, "steps": STEPS, "val_cases": 1, "seed": 5, "checkpoint_interval": 4,
        "site_optimizer": {"lr": 1e-3}, "server_optimizer": {"lr": 1e-3},
        "wire": {"activations": "fp32", "gradients": "fp32"},
    }


def final_checkpoints(state: Path, run_id: str) -> dict[str, Path]:
    paths = {"aggregator": state / "aggregator" / run_id / f"aggregator-step-{STEPS:08d}.safetensors"}
    return paths | {s: state / f"site-{s}" / run_id / f"site-{s}-step-{STEPS:08d}.safetensors" for s in SITES}


def poll(client: httpx.Client, headers: dict[str, str], until, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get("/v1/jobs/faulty", headers=headers).json()
        if until(status):
            return status
        assert status["state"] not in ("succeeded", "failed", "stopped"), status
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


def test_sigkill_of_a_site_and_of_the_aggregator_loses_no_step(
    cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = random.Random(SEED)
    site_fault, aggregator_fault = rng.randint(3, 8), rng.randint(13, 20)
    injected, survived, killed_at = 0, 0, {}
    with LocalFederation(tmp_path / "fed", torch_threads=1) as federation:
        peers = list(SITES)  # names of the aggregator's registry
        for k, name in enumerate(SITES):
            # SITE_SEED: both runs start from the same encoder weights (the site's choice, never the aggregator's)
            federation.start_site(name, [name], cohort.site_dirs[name], seed=SEED + k)
        aggregator = federation.start_aggregator(cohort.labels_dir, env={"AGG_SITE_RETRY_MAX_S": "1"})
        federation.wait_ready(timeout_s=180)
        headers = {"Authorization": f"Bearer {federation.aggregator_token}"}
        with httpx.Client(base_url=aggregator.url, timeout=30) as client:
            clean = run_job(client, job_spec("clean", peers), timeout_s=300, headers=headers)
            assert clean["state"] == "succeeded", clean

            response = client.post("/v1/jobs", json=job_spec("faulty", peers), headers=headers)
            assert response.status_code == 202, response.text
            # fault 1: SIGKILL a site mid-run, restart it a while later on the same port and state folder
            status = poll(client, headers, lambda s: s["step"] >= site_fault)
            federation.kill(f"site-{KILLED_SITE}")
            injected, killed_at["site"] = injected + 1, status["step"]
            waiting = poll(client, headers, lambda s: s["state"] == "waiting_for_site")
            assert waiting["waiting_for"] == [KILLED_SITE], waiting
            federation.restart(f"site-{KILLED_SITE}")
            federation.wait_ready(timeout_s=180)
            poll(client, headers, lambda s: s["state"] == "running" and s["step"] > killed_at["site"])
            survived += 1
            # fault 2: SIGKILL the aggregator mid-job; the restarted one resumes the job by itself
            status = poll(client, headers, lambda s: s["step"] >= aggregator_fault)
            assert status["step"] < STEPS, "the job finished before the aggregator could be killed"
            federation.kill("aggregator")
            injected, killed_at["aggregator"] = injected + 1, status["step"]
            federation.restart("aggregator")
            federation.wait_ready(timeout_s=180)
            final = wait_for_job(client, "faulty", timeout_s=300, headers=headers)
            assert final["state"] == "succeeded", final
            survived += 1

    state = tmp_path / "fed" / "state"
    want, got = final_checkpoints(state, "clean"), final_checkpoints(state, "faulty")
    updates = {party: int(load_file(str(path))["optim.0.step"]) for party, path in got.items()}
    differences = {party: max_weight_difference(checkpoint_weights(got[party]), checkpoint_weights(want[party]))
                   for party in got}
    lost = max(0, *(STEPS - n for n in updates.values()))
    twice = max(0, *(n - STEPS for n in updates.values()))
    with capsys.disabled():
        print(
            f"\nfault injection (seed {SEED}, {STEPS} steps): faults injected {injected}, faults survived {survived} "
            f"(site {KILLED_SITE} killed at step {killed_at['site']}, aggregator at step {killed_at['aggregator']}; "
            f"roll-backs {final['recoveries']}); updates applied per party {updates}; steps lost {lost}; "
            f"steps applied twice {twice}; max |weight difference| vs the uninterrupted run {max(differences.values())}"
        )
    assert injected == survived == 2
    assert set(updates.values()) == {STEPS}, updates
    assert len(final["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(final["losses"], clean["losses"], strict=True)) <= 1e-6
    assert max(differences.values()) <= 1e-6, differences
