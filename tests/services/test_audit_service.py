"""The central audit service in process: a recorded job audited in federated mode (each site's own audit of its
own record, the aggregator's label audit, assembled), the one-off Job form, lab mode and errors.

The sites' own audit routes and the removed data channels are tested in ``test_site_local_audit.py``.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from federation_testkit import AGG_TOKEN, AUDIT_TOKEN, SITES, peers, run_job, write_registry
from pydantic import ValidationError

from services.audit.app import create_app as create_audit_app
from services.audit.settings import AuditJobSettings, AuditSettings
from splitunet.errors import NotFoundError
from splitunet.transcript import Transcript, verify_transcript

#: The audit service's own API takes an operator token; it presents AUDIT_TOKEN (scope ``audit``) to the sites.
OPERATOR_TOKEN = "audit-operator-token-0123456789abcdef"
AUDIT_HEADERS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
SPEC = {
    "sites": peers(("t1", "flair")),
    "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0},
    "roi": [16, 16], "batch_size": 2, "steps": 2, "val_cases": 1, "seed": 3, "run_id": "audited",
    "wire": {"activations": "fp32", "gradients": "fp32"},
}


def _recorded_run(start_app, aggregator_settings, sites, tmp_path):
    from federation_testkit import identity_aligner

    from services.aggregator.app import create_app as create_aggregator_app

    settings = aggregator_settings(transcript={"enabled": True, "dir": tmp_path / "transcripts", "every": 1,
                                               "fsync": False, "record_eval": True})
    app = create_aggregator_app(settings, aligner=identity_aligner,
                                transport_factory=lambda peer: sites[peer.name]._transport)
    client = start_app(app)
    status = run_job(client, SPEC, headers={"Authorization": f"Bearer {AGG_TOKEN}"})
    assert status["state"] == "succeeded", status
    return tmp_path / "transcripts"


def test_job_transcript_records_planned_samples_and_verifies(start_app, aggregator_settings, sites, tmp_path):
    root = _recorded_run(start_app, aggregator_settings, sites, tmp_path)
    assert verify_transcript(root / "audited").ok
    transcript = Transcript(root / "audited")
    train = transcript.records(phase="train")
    assert {(r.step, r.site, r.flow.value) for r in train} == {
        (s, m, f) for s in (1, 2) for m in ("t1", "flair") for f in ("received", "sent")}
    assert all(len(r.samples) == 2 and r.samples[0].size == (16, 16) for r in train)
    assert transcript.records(phase="eval"), "validation forwards are recorded with record_eval"
    assert transcript.run["model"]["cut_level"] == 0


def _wait_audit(client, path: str, headers: dict, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := client.get(path, headers=headers).json())["state"] in ("pending", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def test_audit_service_assembles_the_parties_findings(start_app, aggregator_settings, recording_sites, cohort,
                                                       tmp_path):
    """Federated mode: each site attacks its own record with its own weights and originals and publishes figures;
    the aggregator's label audit runs beside it with its labels; the report assembles them and names the parties."""
    sites = recording_sites
    root = _recorded_run(start_app, aggregator_settings, sites, tmp_path)
    registry = write_registry(tmp_path / "audit-registry", tokens={m: AUDIT_TOKEN for m in SITES})
    app = create_audit_app(AuditSettings(transcripts_dir=root, auth_token=OPERATOR_TOKEN, sites=registry,
                                         labels_dir=cohort.labels_dir),
                           transport_factory=lambda peer: sites[peer.name]._transport)
    audit = start_app(app)
    body = {"run_id": "audited", "sites": peers(("t1", "flair")),
            "spec": {"steps": [2], "attacks": ["whitebox", "unsplit", "label_leakage"], "gate": {"max_ssim": 0.2},
                     "budgets": {"whitebox_iterations": 100, "unsplit_main_iters": 2, "unsplit_inner_iters": 5,
                                 "segmenter_steps": 0}}}
    created = audit.post("/v1/audits", json=body, headers=AUDIT_HEADERS)
    assert created.status_code == 202, created.text
    status = _wait_audit(audit, f"/v1/audits/{created.json()['audit_id']}", AUDIT_HEADERS)
    assert status["state"] == "succeeded", status
    findings = status["result"]["findings"]
    assert {(f["site"], f["attack"]) for f in findings} == {
        (s, a) for s in ("t1", "flair") for a in ("whitebox", "unsplit", "label_leakage")}
    images = [f for f in findings if f["attack"] != "label_leakage"]
    assert all(-1.0 <= f["ssim"] <= 1.0 and f["psnr"] is not None for f in images), images
    labels = [f for f in findings if f["attack"] == "label_leakage"]
    assert all(0.0 <= f["auc"] <= 1.0 and f["ssim"] is None for f in labels), labels
    assert [p["party"] for p in status["parties"]] == ["site:t1", "site:flair", "aggregator"], status["parties"]
    assert all(p["records"] > 0 for p in status["parties"]), status["parties"]
    gate = status["result"]["gate"]
    assert gate["passed"] is all(f["ssim"] <= 0.2 for f in images), (gate, findings)
    if not gate["passed"]:
        assert gate["figure"] == "ssim" and gate["site"] in ("t1", "flair") and gate["value"] > 0.2
    report = audit.get(f"/v1/audits/{created.json()['audit_id']}/report", headers=AUDIT_HEADERS)
    assert report.status_code == 200 and "text/html" in report.headers["content-type"]
    assert "whitebox" in report.text and "site:flair" in report.text and "aggregator" in report.text
    assert "alt='grid'" not in report.text  # no reconstruction reached the central audit to draw


def test_one_off_audit_defaults_to_the_newest_run_and_its_registered_sites(start_app, aggregator_settings,
                                                                             recording_sites, tmp_path):
    """The Job form's defaults (``splitunet audit once`` with no AUDIT_RUN_ID / AUDIT_RUN_SITES)."""
    from services.audit.runtime import AuditManager, AuditRequest

    sites = recording_sites
    root = _recorded_run(start_app, aggregator_settings, sites, tmp_path)
    older = root / "older-run"
    older.mkdir()
    (older / "index.sqlite").write_text("")
    os.utime(older / "index.sqlite", (1, 1))  # written long before the recorded run
    registry = write_registry(tmp_path / "audit-registry", tokens={m: AUDIT_TOKEN for m in SITES})
    settings = AuditJobSettings(transcripts_dir=root, auth_token=OPERATOR_TOKEN, sites=registry,
                                reports_dir=tmp_path / "reports")
    manager = AuditManager(settings, transport_factory=lambda peer: sites[peer.name]._transport)
    try:
        assert manager.newest_run() == "audited"
        assert manager.run_sites("audited") == ["t1", "flair"]  # the run's sites, in the run's order
        status = manager.run_now(AuditRequest(run_id="audited", sites=manager.run_sites("audited"),
                                              spec={"steps": [2], "attacks": ["whitebox"],
                                                    "budgets": {"whitebox_iterations": 20}}))
    finally:
        manager.close()
    assert status.state == "succeeded", status
    assert sorted(f.site for f in status.result.findings) == ["flair", "t1"]


def test_one_off_audit_settings_parse_what_an_operator_writes(tmp_path, monkeypatch):
    registry = write_registry(tmp_path / "audit-registry", tokens={m: AUDIT_TOKEN for m in SITES})
    for key, value in {"AUDIT_TRANSCRIPTS_DIR": str(tmp_path), "AUDIT_SITES": str(registry),
                       "AUDIT_REPORTS_DIR": str(tmp_path / "r"), "AUDIT_AUTH_TOKEN": OPERATOR_TOKEN,
                       "AUDIT_RUN_ID": "", "AUDIT_RUN_SITES": "t1, flair",
                       "AUDIT_RUN_SPEC": '{"steps": [3]}'}.items():
        monkeypatch.setenv(key, value)
    settings = AuditJobSettings()
    assert settings.run_id is None and settings.run_sites == ["t1", "flair"] and settings.run_spec == {"steps": [3]}
    monkeypatch.setenv("AUDIT_RUN_SPEC", "steps: 3")
    with pytest.raises(ValidationError, match="AUDIT_RUN_SPEC is not JSON"):
        AuditJobSettings()
    monkeypatch.setenv("AUDIT_RUN_SPEC", "")
    monkeypatch.setenv("AUDIT_RUN_ID", "../etc")
    with pytest.raises(ValidationError, match="run_id"):
        AuditJobSettings()


def test_one_off_audit_without_a_transcript_says_so(tmp_path):
    from services.audit.runtime import AuditManager

    manager = AuditManager(AuditJobSettings(transcripts_dir=tmp_path / "none", auth_token=OPERATOR_TOKEN,
                                            reports_dir=tmp_path / "r"))
    with pytest.raises(NotFoundError, match="has a job with the transcript on"):
        manager.newest_run()
    manager.close()


def test_audit_service_errors_are_clear(start_app, tmp_path):
    (tmp_path / "t").mkdir()
    registry = write_registry(tmp_path / "audit-registry", tokens={m: AUDIT_TOKEN for m in SITES})
    audit = start_app(create_audit_app(AuditSettings(transcripts_dir=tmp_path / "t", auth_token=OPERATOR_TOKEN,
                                                     sites=registry)))
    missing = audit.post("/v1/audits", json={"run_id": "nope", "sites": peers()}, headers=AUDIT_HEADERS)
    assert missing.status_code == 404 and "no transcript" in missing.json()["message"]
    assert audit.post("/v1/audits", json={"run_id": "../etc"}, headers=AUDIT_HEADERS).status_code == 422
    # sites are names of the audit's own registry: never URLs or credential files (no confused deputy)
    deputy = {"run_id": "nope", "sites": [{"name": "t1", "url": "http://attacker.test", "token_file": "/etc/passwd"}]}
    assert audit.post("/v1/audits", json=deputy, headers=AUDIT_HEADERS).status_code == 422
    assert audit.get("/v1/audits/audit-000000000000", headers=AUDIT_HEADERS).status_code == 404
    assert audit.post("/v1/audits", json={"run_id": "nope"}).status_code == 401


def test_audit_run_command_in_lab_mode(start_app, aggregator_settings, sites, cohort, tmp_path):
    from typer.testing import CliRunner

    from splitunet.cli import app

    root = _recorded_run(start_app, aggregator_settings, sites, tmp_path)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, [
        "audit", "run", str(root / "audited"), "--lab-images", str(cohort.site_dirs["t1"]),
        "--lab-labels", str(cohort.labels_dir), "--snapshots", f"t1={tmp_path / 'site-t1-state'}",
        "--sites", "t1", "--steps", "2", "--attacks", "whitebox,label_leakage", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[: result.output.rindex("}") + 1])
    kinds = {f["attack"]: f for f in doc["findings"]}
    assert set(kinds) == {"whitebox", "label_leakage"}
    assert kinds["whitebox"]["ssim"] is not None and kinds["whitebox"]["reid_top1"] is not None
    assert 0.0 <= kinds["label_leakage"]["auc"] <= 1.0 and kinds["label_leakage"]["baseline_empty_dice"] == 0.0
    assert "t1" in doc["dcor"]
    assert "data:image/png;base64" in out.read_text()  # lab mode draws the reconstruction grid
