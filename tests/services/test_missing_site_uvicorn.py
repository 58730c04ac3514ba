"""A site that goes away, with real processes: training continues without it, inference answers without it.

Three site services and the aggregator run under uvicorn on 127.0.0.1. A job with ``missing_site_policy:
continue`` trains while site ``t2`` is SIGKILLed: the job never waits nor rolls back, it trains on with ``t1`` and
``flair``; ``t2`` is restarted over its state folder, re-admitted (restored to its latest checkpoint first) and
trains on until the job is stopped after its next checkpoint. The steps it missed are reported, and its encoder's
optimizer applied exactly the steps it was not reported missing (Adam's own step count, read from its checkpoint).
Then ``t2`` is killed again and ``/v1/infer`` and validation answer with the other sites and name them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from federation_testkit import Cohort, wait_for_job
from safetensors.torch import load_file

from splitunet.launcher import LocalFederation

STEPS = 100_000  # stopped once the killed site is back and checkpointed again
SITES = ("t1", "t2", "flair")
KILLED = "t2"
INTERVAL = 10


def job_spec(run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id, "sites": list(SITES), "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 1},
        "roi": [16, 16], "batch_size": 2, "steps": STEPS, "val_cases": 1, "seed": 5,
        "checkpoint_interval": INTERVAL, "missing_site_policy": "continue",
        "site_optimizer": {"lr": 1e-3}, "server_optimizer": {"lr": 1e-3},
    }


def poll(client: httpx.Client, headers: dict[str, str], until, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get("/v1/jobs/drop", headers=headers).json()
        if until(status):
            return status
        assert status["state"] not in ("succeeded", "failed", "stopped"), status
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


def adam_steps(path: Path) -> int:
    """Adam's step count of a checkpoint (the most of its parameters': an absent embedding may have fewer)."""
    return max(int(v) for k, v in load_file(str(path)).items() if k.startswith("optim.") and k.endswith(".step"))


def test_a_job_that_continues_survives_a_killed_site_and_readmits_it(cohort: Cohort, tmp_path: Path) -> None:
    with LocalFederation(tmp_path / "fed", torch_threads=1) as federation:
        for k, name in enumerate(SITES):
            federation.start_site(name, [name], cohort.site_dirs[name], seed=31 + k)
        aggregator = federation.start_aggregator(cohort.labels_dir, env={"AGG_SITE_RETRY_MAX_S": "0.5"})
        federation.wait_ready(timeout_s=180)
        headers = {"Authorization": f"Bearer {federation.aggregator_token}"}
        with httpx.Client(base_url=aggregator.url, timeout=60) as client:
            response = client.post("/v1/jobs", json=job_spec("drop"), headers=headers)
            assert response.status_code == 202, response.text

            killed_at = poll(client, headers, lambda s: s["step"] >= 15)["step"]
            federation.kill(f"site-{KILLED}")
            offline = poll(client, headers, lambda s: KILLED in s["attendance"].get("offline", {}))
            # the job goes on without it: steps advance, it never waits for the site nor rolls back
            going_on = poll(client, headers, lambda s: s["step"] >= offline["step"] + 3)
            assert going_on["state"] == "running" and going_on["recoveries"] == 0, going_on
            assert going_on["waiting_for"] == [], going_on
            federation.restart(f"site-{KILLED}")
            federation.wait_ready(timeout_s=180)
            back = poll(client, headers, lambda s: s["attendance"].get("offline") == {})
            [[first, last]] = back["attendance"]["missed_steps"][KILLED]
            poll(client, headers, lambda s: (s["checkpoint_step"] or 0) >= last + 1 + INTERVAL)
            assert client.post("/v1/jobs/drop/stop", headers=headers).status_code == 200
            final = wait_for_job(client, "drop", timeout_s=120, headers=headers)

            assert final["state"] == "stopped" and final["recoveries"] == 0, final
            # missed: from the step after its last checkpoint, to the step before its re-admission
            assert final["attendance"]["missed_steps"] == {KILLED: [[first, last]]}, final["attendance"]
            assert first % INTERVAL == 1 and killed_at - INTERVAL < first <= offline["step"] + 1, final["attendance"]
            assert offline["step"] <= last < final["step"], final["attendance"]
            missed = final["attendance"]["missed_step_counts"][KILLED]
            assert missed == last - first + 1
            subsets = {tuple(s["sites"]): s["steps"] for s in final["model_card"]["trained_subsets"]}
            assert subsets[("t1", "flair")] >= 3 and subsets[SITES] >= INTERVAL, subsets
            assert final["model_card"]["absent_sites"] == "learned per-site embedding", final["model_card"]

            step = final["checkpoint_step"]
            state = tmp_path / "fed" / "state"
            updates = {s: adam_steps(state / f"site-{s}" / "drop" / f"site-{s}-step-{step:08d}.safetensors")
                       for s in SITES}
            updates["aggregator"] = adam_steps(state / "aggregator" / "drop"
                                               / f"aggregator-step-{step:08d}.safetensors")
            # at the latest checkpoint the re-admitted site trained every step but those reported missed
            assert updates == {"t1": step, "t2": step - missed, "flair": step, "aggregator": step}, updates

            # inference and validation with a site down: the others answer, and the response names them
            federation.kill(f"site-{KILLED}")
            case = final["val_case_ids"][0]
            answer = client.post("/v1/infer", json={"case_id": case, "job_id": "drop"}, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-sites-used"] == "t1,flair"
            assert answer.content[:2] == b"\x1f\x8b"  # a gzip'd NIfTI
            chosen = client.post("/v1/infer", json={"case_id": case, "job_id": "drop", "sites": ["flair"]},
                                 headers=headers)
            assert chosen.status_code == 200 and chosen.headers["x-sites-used"] == "flair", chosen.text
            validation = client.post("/v1/jobs/drop/validate", json={}, headers=headers)
            assert validation.status_code == 200, validation.text
            assert validation.json()["sites_used"] == ["t1", "flair"]
            assert set(validation.json()["dice"]) >= {"TC", "WT", "ET"}
            unknown = client.post("/v1/infer", json={"case_id": case, "job_id": "drop", "sites": ["pet"]},
                                  headers=headers)
            assert unknown.status_code == 422 and "subset" in unknown.text, unknown.text
