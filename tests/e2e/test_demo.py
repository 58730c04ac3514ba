"""End to end: `splitunet demo --quick` with real uvicorn processes and real HTTP (4 sites, the aggregator, the
audit service), the baselines, the quick privacy-utility study, report.json with every stable key, report.html
checked in headless Chromium (screenshot kept beside it), and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from report_browser import check_page

from splitunet.launcher import service_environment

SERVICES = ["aggregator", "audit", "site-flair", "site-t1", "site-t1ce", "site-t2"]
REGIONS = {"TC", "WT", "ET", "mean"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it holds no resources but is not "running"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _demo(workdir: Path, *extra: str) -> subprocess.Popen:
    # the services' settings come only from the demo, never from a SITE_*/AGG_* left in the caller's shell
    env = {**service_environment(os.environ), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "splitunet", "demo", "--quick", "--workdir", str(workdir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """A test run started in the background of a shell inherits an ignored SIGINT; the demo must see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(proc: subprocess.Popen, workdir: Path, timeout_s: float) -> str:
    """Wait for the demo; on timeout stop its whole process group and every service it started, then fail."""
    try:
        return proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGTERM)  # the demo unwinds (SIGTERM = Ctrl-C) and stops its services
        try:
            output = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            output = proc.communicate()[0]
        manifest = workdir / "services.json"
        for service in json.loads(manifest.read_text()) if manifest.is_file() else []:
            _kill_group(service["pid"], signal.SIGKILL)  # each service runs in its own group
        raise AssertionError(f"the demo did not finish in {timeout_s:.0f} s; output:\n{output}") from None


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def test_demo_quick_trains_through_real_services(tmp_path, monkeypatch):
    # settings left in the caller's shell reach no service (inherited, these would refuse every forward and
    # stop the aggregator from starting)
    monkeypatch.setenv("SITE_MAX_BATCH_VOXELS", "1")
    monkeypatch.setenv("AGG_CACHE_CASES", "0")
    workdir = tmp_path / "run"
    proc = _demo(workdir)
    # a hang guard, not a speed check (the demo reports its own timing): the quick demo trains the split model,
    # five baselines and a defended configuration and audits two runs, slower by several times on a shared machine
    output = _finish(proc, workdir, 1800)
    assert proc.returncode == 0, output
    report = json.loads((workdir / "report.json").read_text())
    dice = report["dice"]["split"]
    assert set(dice) == {"TC", "WT", "ET", "mean"}
    # the quality targets of the quick demo on held-out phantom cases (WT: the issue's; TC, ET: well below the
    # measured 2D figures of docs/results/demo.md, far above an untrained model's)
    assert dice["WT"] >= 0.70 and dice["TC"] >= 0.60 and dice["ET"] >= 0.50, report["dice"]
    assert report["cases"]["validation"] >= 4 and len(report["per_case"]) == report["cases"]["validation"]
    assert all(0.0 <= c["hd95"]["WT"] <= 373.13 for c in report["per_case"]), report["per_case"]
    assert report["timing"]["total_s"] > 0
    services = json.loads((workdir / "services.json").read_text())
    assert sorted(s["name"] for s in services) == SERVICES
    assert not [s for s in services if _alive(s["pid"])], "service processes left running"
    # inference: a NIfTI on the case's original grid
    pred = Path(report["inference"])
    case_id = pred.name.removesuffix("_pred.nii.gz")
    seg = next((workdir / "partition" / "aggregator" / case_id).glob("*seg.nii*"))
    out, ref = nib.load(pred), nib.load(seg)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine)
    predicted, truth = np.asarray(out.dataobj), np.asarray(ref.dataobj)
    assert set(np.unique(predicted)) <= {0, 1, 2, 4}
    # ... that finds the tumour: whole-tumour Dice of the written file against the true segmentation
    assert _dice(predicted > 0, truth > 0) > 0.5, _dice(predicted > 0, truth > 0)
    _check_paper_report(report, workdir, output)


def _check_paper_report(report: dict, workdir: Path, output: str) -> None:
    """The issue's stable keys, measured (not empty), and the page in a browser."""
    for key in ("dice", "hd95_mm", "study", "best", "timing", "machine"):
        assert key in report, key
    assert set(report["dice"]["centralized"]) == REGIONS
    assert set(report["dice"]["single_modality"]) == {"t1", "t1ce", "t2", "flair"}
    assert all(set(d) == REGIONS for d in report["dice"]["single_modality"].values())
    assert set(report["hd95_mm"]) >= {"split", "centralized", "single_modality"}
    # matched capacity: the fair upper bound's parameter count is the split model's within 5 %
    params = report["parameters"]
    assert abs(params["centralized_matched"] - params["split"]) <= 0.05 * params["split"], params
    assert all(abs(n - params["split"]) <= 0.05 * params["split"] for n in params["single_modality"].values())
    assert set(report["dice"]["centralized_matched"]) == REGIONS
    # raw and post-processed figures of every model, the split model's from the inferred files of every case
    post = report["postprocessed"]
    assert set(post) >= {"split", "centralized", "centralized_matched", "t1", "t1ce", "t2", "flair"}, set(post)
    assert len(post["split"]["raw"]["per_case"]) == report["cases"]["validation"]
    for figures in post.values():
        assert set(figures["postprocessed"]["hd95"]) == REGIONS and set(figures["rules"]) == {"TC", "WT", "ET"}
    assert report["timing"]["total_s"] > 0 and report["timing"]["split_step_s"] > 0
    assert report["machine"]["cores"] >= 1
    names = [row["name"] for row in report["study"]]
    assert "none" in names and len(names) >= 2, names
    for row in report["study"]:
        assert row["error"] is None, row
        for key in ("defenses", "cut_level", "skips", "fusion", "dice", "leakage", "label_leakage", "bytes_per_step",
                    "epsilon", "train_s"):
            assert key in row, (row["name"], key)
        assert row["dice"]["WT"] is not None and row["bytes_per_step"] > 0 and row["train_s"] > 0
        attacks = {(f["site"], f["attack"]) for f in row["leakage"]}
        # a secure-sum run is attacked where its data is readable: the decoded sum, by the joint inversion with
        # every site's encoder (a site's masked tensor alone is uniform); every other run by the per-site attacks
        expected = {"secure_sum_joint"} if row["name"] == "secure-sum" else {"whitebox", "unsplit", "learned"}
        assert {a for _, a in attacks} >= expected, (row["name"], attacks)
        assert {s for s, _ in attacks} == {"t1", "t1ce", "t2", "flair"}, attacks
        for f in row["leakage"]:
            assert set(f) >= {"site", "modality", "attack", "ssim", "psnr", "rdlv", "delta_ssim", "delta_ssim_low"}
        assert set(row["label_leakage"]) >= {"dice", "auc"}, row["label_leakage"]
    assert set(report["best"]) == {"name", "why"} and report["best"]["why"]
    assert report["best"]["name"] in (None, *names)
    assert "best:" in output
    figures = {p.name for p in (workdir / "figures").glob("*.png")}
    assert {"dice.png", "privacy_utility.png", "bytes_per_step.png", "training_curves.png"} <= figures, figures
    assert any(name.startswith("recon-") for name in figures), figures
    check = check_page(workdir / "report.html", workdir / "report-screenshot.png")
    assert check.console_errors == [], check.console_errors
    assert len(check.images) >= 5 and check.broken_images == [], check.images


def test_demo_interrupt_stops_every_process(tmp_path):
    workdir = tmp_path / "run"
    proc = _demo(workdir, "--steps", "100000")
    manifest = workdir / "services.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if manifest.is_file() and len(json.loads(manifest.read_text())) == len(SERVICES):
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.5)
        time.sleep(5)  # let the services come up and the job start
    except BaseException:
        _finish(proc, workdir, 0.1)  # stops the group and every service, then fails with the output
        raise
    proc.send_signal(signal.SIGINT)
    output = _finish(proc, workdir, 120)
    assert proc.returncode != 0
    assert "interrupted" in output
    services = json.loads(manifest.read_text())
    assert len(services) == len(SERVICES)
    assert not [s for s in services if _alive(s["pid"])], "service processes left running after Ctrl-C"
