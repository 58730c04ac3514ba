"""The audit service in process: a recorded job's transcript attacked in federated mode through the sites' audit
endpoints (weights at the recorded step, scoring in place), results, report and errors; the site endpoints alone.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from federation_testkit import AGG_TOKEN, AUDIT_TOKEN, SITE_HEADERS, SITES, peers, run_job, write_registry
from pydantic import ValidationError

from services.audit.app import create_app as create_audit_app
from services.audit.settings import AuditJobSettings, AuditSettings
from splitunet.errors import NotFoundError
from splitunet.transcript import Transcript, verify_transcript
from splitunet.wire import CONTENT_TYPE, BundleKind, BundleMeta, WireDtype, encode_bundle

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


def test_audit_service_attacks_a_recorded_run_in_federated_mode(start_app, aggregator_settings, sites, tmp_path):
    root = _recorded_run(start_app, aggregator_settings, sites, tmp_path)
    registry = write_registry(tmp_path / "audit-registry", tokens={m: AUDIT_TOKEN for m in SITES})
    app = create_audit_app(AuditSettings(transcripts_dir=root, auth_token=OPERATOR_TOKEN, sites=registry),
                           transport_factory=lambda peer: sites[peer.name]._transport)
    audit = start_app(app)
    body = {"run_id": "audited", "sites": peers(("t1", "flair")),
            "spec": {"steps": [2], "attacks": ["whitebox", "unsplit"], "gate": {"max_ssim": 0.2},
                     "budgets": {"whitebox_iterations": 100, "unsplit_main_iters": 2, "unsplit_inner_iters": 5}}}
    created = audit.post("/v1/audits", json=body, headers=AUDIT_HEADERS)
    assert created.status_code == 202, created.text
    audit_id = created.json()["audit_id"]
    deadline = time.monotonic() + 120
    while (status := audit.get(f"/v1/audits/{audit_id}", headers=AUDIT_HEADERS).json())["state"] in (
            "pending", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["state"] == "succeeded", status
    findings = status["result"]["findings"]
    assert {(f["site"], f["attack"]) for f in findings} == {
        (s, a) for s in ("t1", "flair") for a in ("whitebox", "unsplit")}
    whitebox = [f for f in findings if f["attack"] == "whitebox"]
    assert all(-1.0 <= f["ssim"] <= 1.0 and f["psnr"] is not None for f in findings), findings
    best = max(whitebox, key=lambda f: f["ssim"])
    gate = status["result"]["gate"]
    assert gate["passed"] is (best["ssim"] <= 0.2 and all(f["ssim"] <= 0.2 for f in findings)), (gate, findings)
    if not gate["passed"]:
        assert gate["figure"] == "ssim" and gate["site"] in ("t1", "flair") and gate["value"] > 0.2
    report = audit.get(f"/v1/audits/{audit_id}/report", headers=AUDIT_HEADERS)
    assert report.status_code == 200 and "text/html" in report.headers["content-type"]
    assert "data:image/png;base64" in report.text and "whitebox" in report.text


def test_one_off_audit_defaults_to_the_newest_run_and_its_registered_sites(start_app, aggregator_settings, sites,
                                                                             tmp_path):
    """The Job form's defaults (``splitunet audit once`` with no AUDIT_RUN_ID / AUDIT_RUN_SITES)."""
    from services.audit.runtime import AuditManager, AuditRequest

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


def test_site_audit_endpoints(site, cohort, tmp_path):
    from federation_testkit import align_site, model_config

    config = model_config(features=(4, 8, 16), cut_level=0)
    assert align_site(site, cohort.case_ids).status_code == 200
    setup = {"run_id": "r1", "model": config.model_dump(mode="json")}
    assert site.post("/v1/runs", json=setup, headers=SITE_HEADERS).status_code == 200
    sample = {"case_id": "BraTS2021_00000", "start": [0, 0], "size": [16, 16], "axial_index": 8}
    forward = site.post("/v1/runs/r1/forward", json={"step": 0, "phase": "train", "samples": [sample]},
                        headers=SITE_HEADERS)
    assert forward.status_code == 200, forward.text
    audit_headers = {"Authorization": f"Bearer {AUDIT_TOKEN}"}
    # audit routes take only the audit credential: the aggregator's token of this site is of another scope
    refused = site.get("/v1/runs/r1/audit/encoder", params={"step": 0}, headers=SITE_HEADERS)
    assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
    weights = site.get("/v1/runs/r1/audit/encoder", params={"step": 0}, headers=audit_headers)
    assert weights.status_code == 200
    from safetensors.torch import load

    assert set(load(weights.content)) == set(site.app.state.runtime.encoder("r1").state_dict())
    assert site.get("/v1/runs/r1/audit/encoder", params={"step": 7}, headers=audit_headers).status_code == 404

    def bundle(extra: dict, shape=(1, 1, 16, 16)) -> bytes:
        meta = BundleMeta(run_id="r1", step=0, site="t1", kind=BundleKind.ACTIVATIONS, extra=extra)
        return encode_bundle({"reconstruction": torch.zeros(shape)}, meta=meta, dtype=WireDtype.FP32,
                             max_bytes=2**20)

    headers = audit_headers | {"Content-Type": CONTENT_TYPE}
    assert site.post("/v1/score", content=bundle({"samples": json.dumps([sample])}),
                     headers=SITE_HEADERS | {"Content-Type": CONTENT_TYPE}).status_code == 403
    ok = site.post("/v1/score", content=bundle({"samples": json.dumps([sample])}), headers=headers)
    assert ok.status_code == 200, ok.text
    scores = ok.json()["scores"]["reconstruction"]
    assert len(scores) == 1 and scores[0]["modality"] == "t1" and scores[0]["ssim"] < 0.5
    # numbers, never images; no segmenter sent: no semantic leakage
    assert set(scores[0]) == {"index", "case_id", "modality", "ssim", "psnr", "nmse", "semantic"}
    assert scores[0]["semantic"] is None
    bad = site.post("/v1/score", content=bundle({"samples": "not json"}), headers=headers)
    assert bad.status_code == 400 and "x.samples" in bad.json()["message"]
    wrong = site.post("/v1/score", content=bundle({"samples": json.dumps([sample])}, (1, 1, 8, 8)), headers=headers)
    assert wrong.status_code == 400


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


def test_site_scores_semantic_leakage_with_the_audits_segmenter(site, cohort, tmp_path):
    """Federated scoring ships the audit's WT segmenter with the reconstructions; the site's semantic leakage equals
    what lab mode computes on the same originals, and bad segmenter weights are a clear 422."""
    import numpy as np

    from splitunet.auditing.cohorts import LabCohort
    from splitunet.auditing.segmenter import ARCHITECTURE, to_wire_tensors, train_segmenter
    from splitunet.auditing.sources import LabScorer, SiteAuditClient
    from splitunet.data.sampling import Sample

    lab = LabCohort(cohort.site_dirs["t1"], cohort.labels_dir)

    def crop(case: str, z: int) -> Sample:
        return Sample(case_id=case, start=(0, 0), size=(16, 16), axial_index=z, volume_shape=cohort.shape)

    train = [crop(c, z) for c in cohort.case_ids[:3] for z in (5, 6, 7, 8, 9)]
    segmenter = train_segmenter(lab.images(train, ["t1"]), lab.masks(train).astype(np.float32), steps=60,
                                modality="t1")
    samples = [crop(cohort.case_ids[3], 7), crop(cohort.case_ids[3], 8)]
    originals = torch.from_numpy(lab.images(samples, ["t1"]))
    noisy = originals + 0.3 * torch.randn(originals.shape, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(originals.shape, generator=torch.Generator().manual_seed(1)) * (originals != 0)
    tensors = {"reconstruction": noisy, "prior": noise}
    registry = write_registry(tmp_path / "audit-registry", tokens={m: AUDIT_TOKEN for m in SITES})
    (peer,) = AuditSettings(transcripts_dir=tmp_path, auth_token=OPERATOR_TOKEN, sites=registry).registry().resolve(
        ["t1"])
    client = SiteAuditClient([peer], transport_factory=lambda p: site._transport)
    try:
        federated = client.score("t1", ["t1"], "r1", 0, samples, tensors, segmenters={"t1": segmenter})
    finally:
        client.close()
    local = LabScorer(lab).score("t1", ["t1"], "r1", 0, samples, tensors, segmenters={"t1": segmenter})
    for name in tensors:
        assert [r["semantic"] for r in federated[name]] == pytest.approx([r["semantic"] for r in local[name]])
    assert all(r["semantic"] is not None and r["semantic"] > 0.5 for r in federated["reconstruction"]), federated
    # noise in the brain as the "prior": the tumour it shows is far less than the close reconstruction's
    semantic = {name: [r["semantic"] for r in rows] for name, rows in federated.items()}
    assert max(semantic["prior"]) < min(semantic["reconstruction"]) - 0.3, semantic

    headers = {"Authorization": f"Bearer {AUDIT_TOKEN}", "Content-Type": CONTENT_TYPE}
    sample_json = json.dumps([s.model_dump(mode="json") for s in samples])

    def post(weights: dict, architecture: str | None = ARCHITECTURE, images: bool = True):
        extra = {"samples": sample_json} | ({"segmenter": architecture} if architecture else {})
        meta = BundleMeta(run_id="r1", step=0, site="t1", kind=BundleKind.ACTIVATIONS, extra=extra)
        body = encode_bundle(({"reconstruction": noisy} if images else {}) | weights, meta=meta,
                             dtype=WireDtype.FP32, max_bytes=2**22)
        return site.post("/v1/score", content=body, headers=headers)

    weights = to_wire_tensors({"t1": segmenter})
    assert post(weights).status_code == 200
    key = "segmenter/t1/model.0.conv.weight"
    wrong = post(weights | {key: torch.zeros(8, 2, 3, 3)})
    assert wrong.status_code == 422 and key in wrong.json()["message"] and "(8, 1, 3, 3)" in wrong.json()["message"]
    missing = post({k: v for k, v in weights.items() if k != key})
    assert missing.status_code == 422 and "model.0.conv.weight" in missing.json()["message"]
    extra_tensor = post(weights | {"segmenter/t1/model.9.weight": torch.zeros(3)})
    assert extra_tensor.status_code == 422 and "unexpected" in extra_tensor.json()["message"]
    foreign = post({k.replace("/t1/", "/flair/"): v for k, v in weights.items()})
    assert foreign.status_code == 422 and "flair" in foreign.json()["message"]
    unknown = post(weights, architecture="resnet/9")
    assert unknown.status_code == 422 and ARCHITECTURE in unknown.json()["message"]
    unannounced = post(weights, architecture=None)
    assert unannounced.status_code == 422 and "x.segmenter" in unannounced.json()["message"]
    announced_only = post({}, architecture=ARCHITECTURE)
    assert announced_only.status_code == 422 and "no segmenter/" in announced_only.json()["message"]
    weights_only = post(weights, images=False)
    assert weights_only.status_code == 400 and "reconstruction" in weights_only.json()["message"]
