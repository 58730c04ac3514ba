"""``splitunet audit verify``: exit 0 on an intact transcript, 1 naming the first bad record, 2 on a bad folder."""

from __future__ import annotations

import sqlite3

import torch
from typer.testing import CliRunner

from splitunet.cli import app
from splitunet.recorder import Flow
from splitunet.transcript import INDEX, TranscriptRecorder, TranscriptSettings
from splitunet.wire import BundleKind, BundleMeta, WireDtype, encode_bundle, frame_sha256


def test_audit_verify_command(tmp_path):
    recorder = TranscriptRecorder(TranscriptSettings(dir=tmp_path, every=1, fsync=False))
    for step in range(1, 4):
        data = encode_bundle({"level0": torch.ones(1, 2, 4, 4) * step},
                             meta=BundleMeta(run_id="r", step=step, site="t1", kind=BundleKind.ACTIVATIONS),
                             dtype=WireDtype.FP32, max_bytes=2**20)
        recorder.record(run_id="r", step=step, site="t1", flow=Flow.RECEIVED, phase="train", data=data,
                        sha256=frame_sha256(data))
    recorder.close()
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", str(tmp_path / "r")])
    assert ok.exit_code == 0 and "OK: 3 records" in ok.output, ok.output
    db = sqlite3.connect(tmp_path / "r" / INDEX)
    db.execute("DELETE FROM records WHERE seq = 2")
    db.commit()
    db.close()
    bad = runner.invoke(app, ["audit", "verify", str(tmp_path / "r")])
    assert bad.exit_code == 1 and "first bad record 2" in bad.output, bad.output
    missing = runner.invoke(app, ["audit", "verify", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a transcript folder" in missing.output
