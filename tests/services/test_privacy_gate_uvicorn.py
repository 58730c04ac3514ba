"""The data owner's gate with real processes: 2 site services and the aggregator under uvicorn on 127.0.0.1.

Site ``t1`` holds a leakage threshold every undefended run exceeds and checks it with its own audit every 2 steps
(``SITE_POLICY__LEAKAGE__*``); before step 3's activations leave it stops releasing, the aggregator's job pauses
(``paused_by_privacy_gate``, site and figure named), and a resume cannot override the site: the job is refused
again until it is stopped.
"""

from __future__ import annotations

import time

import httpx
from federation_testkit import Cohort, wait_for_job

from splitunet.launcher import LocalFederation
from splitunet.transcript import Transcript, verify_transcript

GATE_SITES = ("t1", "flair")


def test_a_sites_gate_pauses_a_real_job_over_rest(cohort: Cohort, tmp_path):
    gate_env = {
        "SITE_POLICY__LEAKAGE__EVERY": "2", "SITE_POLICY__LEAKAGE__MAX_SSIM": "-0.5",
        "SITE_POLICY__LEAKAGE__WHITEBOX_ITERATIONS": "30", "SITE_POLICY__LEAKAGE__MAX_SAMPLES": "1",
        "SITE_TRANSCRIPT__EVERY": "1", "SITE_TRANSCRIPT__FSYNC": "false",
    }
    with LocalFederation(tmp_path / "fed", torch_threads=1) as federation:
        federation.start_site("t1", ["t1"], cohort.site_dirs["t1"], env=gate_env)
        federation.start_site("flair", ["flair"], cohort.site_dirs["flair"])
        aggregator = federation.start_aggregator(cohort.labels_dir, env={"AGG_TRANSCRIPT__FSYNC": "false"})
        federation.wait_ready(timeout_s=180)
        spec = {
            "run_id": "gated", "sites": list(GATE_SITES),
            "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0},
            "roi": [16, 16], "batch_size": 2, "steps": 3, "val_cases": 1, "seed": 5,
        }
        headers = {"Authorization": f"Bearer {federation.aggregator_token}"}
        with httpx.Client(base_url=aggregator.url, timeout=60) as client:
            created = client.post("/v1/jobs", json=spec, headers=headers)
            assert created.status_code == 202, created.text
            paused = wait_for_job(client, "gated", ("paused_by_privacy_gate", "succeeded", "failed", "stopped"),
                                  timeout_s=300, headers=headers)
            assert paused["state"] == "paused_by_privacy_gate", paused
            gate = paused["privacy_gate"]
            assert gate["passed"] is False and gate["site"] == "t1" and gate["figure"] == "ssim", gate
            assert gate["attack"] == "whitebox" and gate["step"] == 2 and gate["threshold"] == -0.5, gate
            time.sleep(1.0)
            still = client.get("/v1/jobs/gated", headers=headers).json()
            assert still["state"] == "paused_by_privacy_gate" and still["step"] == 2, still
            resumed = client.post("/v1/jobs/gated/resume", headers=headers)
            assert resumed.status_code == 200, resumed.text
            again = wait_for_job(client, "gated", ("paused_by_privacy_gate", "succeeded", "failed", "stopped"),
                                 timeout_s=300, headers=headers)
            assert again["state"] == "paused_by_privacy_gate" and again["privacy_gate"]["site"] == "t1", again
            assert client.post("/v1/jobs/gated/stop", headers=headers).status_code in (200, 202)
            assert wait_for_job(client, "gated", timeout_s=120, headers=headers)["state"] == "stopped"
    own = tmp_path / "fed" / "state" / "site-t1" / "transcripts" / "gated"
    assert verify_transcript(own).ok
    record = Transcript(own)
    assert max(r.step for r in record.records(phase="train") if r.flow.value == "sent") == 2
    record.close()
