"""End to end: `splitunet demo --quick` with real uvicorn processes and real HTTP, and nothing left behind."""

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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "splitunet", "demo", "--quick", "--workdir", str(workdir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )


def test_demo_quick_trains_through_real_services(tmp_path):
    workdir = tmp_path / "run"
    proc = _demo(workdir)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    report = json.loads((workdir / "report.json").read_text())
    dice = report["dice"]["split"]
    assert set(dice) == {"TC", "WT", "ET", "mean"}
    # the quality target for the quick demo on held-out phantom cases
    assert dice["WT"] >= 0.70, report
    assert report["timing"]["total_s"] > 0 and report["cases"]["validation"] >= 1
    services = json.loads((workdir / "services.json").read_text())
    assert sorted(s["name"] for s in services) == ["aggregator", "site-flair", "site-t1", "site-t1ce", "site-t2"]
    assert not [s for s in services if _alive(s["pid"])], "service processes left running"
    # inference: a NIfTI on the case's original grid
    pred = Path(report["inference"])
    case_id = pred.name.removesuffix("_pred.nii.gz")
    seg = next((workdir / "partition" / "aggregator" / case_id).glob("*seg.nii*"))
    out, ref = nib.load(pred), nib.load(seg)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 4}


def test_demo_interrupt_stops_every_process(tmp_path):
    workdir = tmp_path / "run"
    proc = _demo(workdir, "--steps", "100000")
    manifest = workdir / "services.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())) == 5:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.5)
    time.sleep(5)  # let the services come up and the job start
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted" in output
    services = json.loads(manifest.read_text())
    assert len(services) == 5
    assert not [s for s in services if _alive(s["pid"])], "service processes left running after Ctrl-C"
