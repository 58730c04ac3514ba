"""The privacy gate with real processes: 2 site services and the aggregator under uvicorn on 127.0.0.1.

The aggregator records the traffic and runs a white-box gate audit every 2 steps through the sites' audit
endpoints; a threshold every undefended run exceeds pauses the job (``paused_by_privacy_gate``, site and figure
named) until ``POST /v1/jobs/{id}/resume``, after which it runs to the end.
"""

from __future__ import annotations

import time

import httpx
from federation_testkit import Cohort, wait_for_job

from splitunet.launcher import LocalFederation
from splitunet.transcript import verify_transcript

GATE_SITES = ("t1", "flair")


def test_gate_pauses_a_real_job_over_rest_and_resume_continues_it(cohort: Cohort, tmp_path):
    transcripts = tmp_path / "transcripts"
    audit_token = tmp_path / "audit-token"
    audit_token.write_text("gate-audit-token-0123456789abcdef\n")
    gate_env = {
        "AGG_TRANSCRIPT__ENABLED": "true", "AGG_TRANSCRIPT__DIR": str(transcripts), "AGG_TRANSCRIPT__EVERY": "5",
        "AGG_TRANSCRIPT__FSYNC": "false", "AGG_PRIVACY_GATE__EVERY": "2", "AGG_PRIVACY_GATE__MAX_SSIM": "-0.5",
        "AGG_PRIVACY_GATE__WHITEBOX_ITERATIONS": "30", "AGG_PRIVACY_GATE__MAX_SAMPLES": "1",
        "AGG_PRIVACY_GATE__AUDIT_TOKEN_FILE": str(audit_token),
    }
    with LocalFederation(tmp_path / "fed", torch_threads=1) as federation:
        for name in GATE_SITES:  # each site accepts the gate's audit credential on its audit routes
            federation.start_site(name, [name], cohort.site_dirs[name],
                                  env={"SITE_SCOPE_TOKEN_FILES__AUDIT": str(audit_token)})
        aggregator = federation.start_aggregator(cohort.labels_dir, env=gate_env)
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
            assert gate["passed"] is False and gate["site"] in GATE_SITES and gate["figure"] == "ssim", gate
            assert gate["attack"] == "whitebox" and gate["step"] == 2 and gate["threshold"] == -0.5
            time.sleep(1.0)
            still = client.get("/v1/jobs/gated", headers=headers).json()
            assert still["state"] == "paused_by_privacy_gate" and still["step"] == 2, still
            resumed = client.post("/v1/jobs/gated/resume", headers=headers)
            assert resumed.status_code == 200, resumed.text
            final = wait_for_job(client, "gated", timeout_s=300, headers=headers)
            assert final["state"] == "succeeded" and final["step"] == 3, final
            again = client.post("/v1/jobs/gated/resume", headers=headers)
            assert again.status_code == 409, again.text
    report = verify_transcript(transcripts / "gated")
    assert report.ok and report.records > 0, report
