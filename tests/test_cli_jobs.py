"""The operator's toolkit end to end: a live local federation (two sites, the aggregator and the audit service
as real uvicorn processes on 127.0.0.1, over TLS) driven only through ``splitunet jobs`` and ``splitunet audits``.

Connection comes from a profile file (``SPLITUNET_PROFILES``); the wrong-token and unreachable cases override
it on the command line. Exit codes checked: 0 success, 1 a job that did not succeed, 2 usage (an invalid spec,
an unknown job), 3 unreachable or refused credential.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from splitunet.cli import app
from splitunet.launcher import LocalFederation, free_port

SITES = ("t1", "flair")
TINY = {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0}


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """``cli(*args)``: run ``splitunet`` in process; every SPLITUNET_* variable of the caller's shell removed."""
    for name in [n for n in os.environ if n.startswith("SPLITUNET_")]:
        monkeypatch.delenv(name)
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)

    return run


def _cohort(root: Path, brats) -> tuple[dict[str, Path], Path, list[str]]:
    ids = []
    for index in range(4):
        for m in SITES:
            brats.write_case(root / f"site-{m}", index, modalities=(m,), seg=False)
        ids.append(brats.write_case(root / "labels", index, modalities=()).name)
    return {m: root / f"site-{m}" for m in SITES}, root / "labels", ids


def test_operator_drives_a_live_federation_through_jobs_and_audits(cli, tmp_path: Path, brats, security) -> None:
    site_dirs, labels_dir, case_ids = _cohort(tmp_path / "cohort", brats)
    with LocalFederation(tmp_path / "fed", torch_threads=1, tls=True) as federation:
        for name in SITES:
            # each site keeps its own record of every step: a site audits what it sent (3 steps here)
            federation.start_site(name, [name], site_dirs[name], seed=3,
                                  env={"SITE_TRANSCRIPT__EVERY": "1", "SITE_TRANSCRIPT__FSYNC": "false"})
        aggregator = federation.start_aggregator(
            labels_dir, env={"AGG_TRANSCRIPT__EVERY": "1", "AGG_TRANSCRIPT__FSYNC": "false"})
        audit = federation.start_audit()
        federation.wait_ready(timeout_s=180)

        profiles = tmp_path / "profiles.toml"
        profiles.write_text(
            'default = "local"\n[profiles.local]\n'
            f'url = "{aggregator.url}"\naudit_url = "{audit.url}"\ntoken_file = "{federation.operator_token_file}"\n'
            f'ca_file = "{federation.ca_file}"\n'
        )
        assert aggregator.url.startswith("https://") and audit.url.startswith("https://")
        env = {"SPLITUNET_PROFILES": str(profiles)}

        # an invalid spec is refused by the client's schema check before anything is sent: usage, 2
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"sites": list(SITES), "model": TINY, "roi": [16, 16, 16]}))
        result = cli("jobs", "submit", bad, env=env)
        assert result.exit_code == 2 and "roi" in result.output, result.output

        # submit --follow: the job trains, validates and succeeds; its id is stdout's first line
        spec = tmp_path / "job.yaml"
        spec.write_text("run_id: cli-a\nsites: [t1, flair]\nmodel: {spatial_dims: 2, features: [4, 8, 16]}\n"
                        "roi: [16, 16]\nbatch_size: 2\nsteps: 3\nval_cases: 1\nseed: 5\n"
                        "wire: {activations: fp32, gradients: fp32}\n")
        result = cli("jobs", "submit", spec, "--follow", "--poll", "0.2", env=env)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0] == "cli-a"
        result = cli("jobs", "status", "cli-a", "--json", env=env)
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)
        assert status["state"] == "succeeded" and status["step"] == 3 and status["validation"]["dice"], status
        result = cli("jobs", "list", "--json", env=env)
        assert result.exit_code == 0 and [j["job_id"] for j in json.loads(result.stdout)] == ["cli-a"]

        # infer one case to a NIfTI on the case's own grid, BraTS labels
        seg = tmp_path / "out" / "seg.nii.gz"
        result = cli("jobs", "infer", case_ids[0], "-o", seg, "--job", "cli-a", env=env)
        assert result.exit_code == 0, result.output
        image = nib.load(str(seg))
        assert image.shape == tuple(brats.SHAPE)
        np.testing.assert_allclose(image.affine, brats.RAS_AFFINE)
        assert set(np.unique(np.asarray(image.dataobj)).tolist()) <= {0, 1, 2, 4}

        # an audit of the recorded run, followed, then its status and its HTML report
        audit_spec = tmp_path / "audit.json"
        audit_spec.write_text(json.dumps({
            "attacks": ["whitebox"], "max_samples": 1, "gate": {"max_ssim": 1.0},
            "budgets": {"whitebox_iterations": 20, "segmenter_steps": 0, "public_cases": 2}}))
        result = cli("audits", "start", "cli-a", "--site", "t1", "--spec", audit_spec, "--follow", "--poll", "0.2",
                     env=env)
        assert result.exit_code == 0, result.output
        audit_id = result.stdout.splitlines()[0]
        result = cli("audits", "status", audit_id, "--json", env=env)
        assert result.exit_code == 0, result.output
        audited = json.loads(result.stdout)
        assert audited["state"] == "succeeded" and audited["result"]["gate"]["passed"] is True
        assert {(f["site"], f["attack"]) for f in audited["result"]["findings"]} == {("t1", "whitebox")}
        report = tmp_path / "out" / "report.html"
        result = cli("audits", "report", audit_id, "-o", report, env=env)
        assert result.exit_code == 0, result.output
        page = report.read_text()
        assert page.lstrip().lower().startswith("<!doctype html") and "cli-a" in page

        # stop a running job, see it stopped (exit 1), resume it from its checkpoint and follow it to the end
        long = tmp_path / "long.json"
        long.write_text(json.dumps({"run_id": "cli-b", "sites": list(SITES), "model": TINY, "roi": [16, 16],
                                    "batch_size": 2, "steps": 150, "val_cases": 1, "seed": 6,
                                    "checkpoint_interval": 2}))
        result = cli("jobs", "submit", long, env=env)
        assert result.exit_code == 0 and result.stdout.strip() == "cli-b", result.output
        deadline = time.monotonic() + 120
        while True:
            result = cli("jobs", "status", "cli-b", "--json", env=env)
            assert result.exit_code == 0, result.output
            running = json.loads(result.stdout)
            if running["checkpoint_step"] is not None and running["checkpoint_step"] >= 2:
                break
            assert time.monotonic() < deadline, running
            time.sleep(0.1)
        result = cli("jobs", "stop", "cli-b", "--wait", "--poll", "0.2", env=env)
        assert result.exit_code == 0 and "stopped" in result.stdout, result.output
        result = cli("jobs", "status", "cli-b", "--json", env=env)
        stopped = json.loads(result.stdout)
        assert result.exit_code == 1 and stopped["state"] == "stopped" and stopped["step"] < 150, stopped
        result = cli("jobs", "resume", "cli-b", "--follow", "--poll", "0.2", env=env)
        assert result.exit_code == 0, result.output
        final = json.loads(cli("jobs", "status", "cli-b", "--json", env=env).stdout)
        assert final["state"] == "succeeded" and final["step"] == 150, final
        assert final["resumed_from_step"] is not None and final["resumed_from_step"] >= 2, final

        # failures a script must tell apart
        result = cli("jobs", "status", "no-such-job", env=env)
        assert result.exit_code == 2 and "no-such-job" in result.output, result.output
        result = cli("audits", "status", "audit-000000000000", env=env)
        assert result.exit_code == 2, result.output
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-operator-token-0123456789\n")
        for command in (("jobs", "status", "cli-a"), ("audits", "status", audit_id)):
            result = cli(*command, "--token-file", wrong, env=env)
            assert result.exit_code == 3 and "HTTP 401" in result.output, result.output
            security.refused("unauthenticated", 401)
        # a service whose certificate this CA did not sign: the TLS handshake fails, unreachable
        from splitunet.service.pki import ThrowawayCA

        rogue = ThrowawayCA(tmp_path / "rogue", "rogue-ca")
        result = cli("jobs", "list", "--ca-file", rogue.cert_file, env=env)
        assert result.exit_code == 3 and "unreachable" in result.output, result.output
        dead = f"http://127.0.0.1:{free_port()}"
        result = cli("jobs", "list", "--url", dead, env=env)
        assert result.exit_code == 3 and "unreachable" in result.output, result.output
        result = cli("jobs", "list", env={})  # no profile file, no variable, no --url: usage
        assert result.exit_code == 2 and "--url" in result.output, result.output

    # the console script itself (not the in-process runner) exits 3 on an unreachable URL
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITUNET_")}
    env |= {"PYTHONPATH": os.pathsep.join(sys.path), "SPLITUNET_PROFILES": str(tmp_path / "none.toml")}
    process = subprocess.run([sys.executable, "-m", "splitunet", "jobs", "list", "--url", dead, "--token-file", wrong],
                             capture_output=True, text=True, timeout=120, env=env)
    assert process.returncode == 3, process.stderr
