"""The transcript: recorded frames, sampling, budget, torn tails, and every kind of tampering detected and named."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from splitunet.data.sampling import Sample
from splitunet.recorder import Flow, Recorder
from splitunet.transcript import (
    FRAMES,
    INDEX,
    Transcript,
    TranscriptRecorder,
    TranscriptSettings,
    verify_transcript,
)
from splitunet.wire import BundleKind, BundleMeta, WireDtype, encode_bundle, frame_sha256

RUN = "run-1"


def frame(step: int, site: str = "t1", kind: BundleKind = BundleKind.ACTIVATIONS, value: float = 0.0) -> bytes:
    tensors = {"level0": torch.full((2, 4, 8, 8), float(step) + value)}
    return encode_bundle(tensors, meta=BundleMeta(run_id=RUN, step=step, site=site, kind=kind),
                         dtype=WireDtype.FP16, max_bytes=2**20)


def samples(step: int) -> list[Sample]:
    return [Sample(case_id=f"case-{step}-{i}", start=(0, 0), size=(8, 8), axial_index=3) for i in range(2)]


def record_steps(recorder: TranscriptRecorder, steps: range, *, sites=("t1", "t2"), phase: str = "train") -> None:
    for step in steps:
        recorder.plan(run_id=RUN, step=step, phase=phase, samples=samples(step))
        for site in sites:
            data = frame(step, site)
            recorder.record(run_id=RUN, step=step, site=site, flow=Flow.RECEIVED, phase=phase, data=data,
                            sha256=frame_sha256(data))
            grad = frame(step, site, BundleKind.GRADIENTS, 0.5)
            recorder.record(run_id=RUN, step=step, site=site, flow=Flow.SENT, phase=phase, data=grad,
                            sha256=frame_sha256(grad))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    recorder = TranscriptRecorder(TranscriptSettings(enabled=True, dir=tmp_path, every=1, fsync=False))
    assert isinstance(recorder, Recorder)
    recorder.start(run_id=RUN, meta={"model": {"cut_level": 0}})
    record_steps(recorder, range(1, 4))  # 3 steps x 2 sites x 2 flows = 12 records
    recorder.checkpoint(run_id=RUN, step=3)
    record_steps(recorder, range(4, 5))  # 4 more records after the written head
    recorder.close()
    return tmp_path / RUN


def execute(run_dir: Path, *statements: str) -> None:
    db = sqlite3.connect(run_dir / INDEX)
    for sql in statements:
        db.execute(sql)
    db.commit()
    db.close()


def test_recorded_transcript_reads_back_and_verifies(run_dir: Path):
    report = verify_transcript(run_dir)
    assert report.ok, report
    assert report.records == 16
    transcript = Transcript(run_dir)
    records = transcript.records(step=2, site="t2", flow=Flow.RECEIVED)
    assert len(records) == 1
    rec = records[0]
    assert [s.case_id for s in rec.samples] == ["case-2-0", "case-2-1"]
    assert rec.tensors == {"level0": [2, 4, 8, 8]} and rec.dtype == "fp16"
    assert transcript.frame(rec) == frame(2, "t2")
    assert transcript.run["model"] == {"cut_level": 0}


def test_sampling_keeps_every_kth_train_step_forced_steps_and_eval_on_request(tmp_path: Path):
    recorder = TranscriptRecorder(TranscriptSettings(dir=tmp_path, every=3, fsync=False, record_eval=True),
                                  force_every=4)
    record_steps(recorder, range(1, 9), sites=("t1",))
    record_steps(recorder, range(5, 6), sites=("t1",), phase="eval")
    recorder.close()
    steps = {(r.step, r.phase) for r in Transcript(tmp_path / RUN).records()}
    assert steps == {(3, "train"), (4, "train"), (6, "train"), (8, "train"), (5, "eval")}


def test_disk_budget_stops_recording(tmp_path: Path):
    size = len(frame(1))
    recorder = TranscriptRecorder(TranscriptSettings(dir=tmp_path, every=1, fsync=False, max_bytes=5 * size))
    record_steps(recorder, range(1, 5), sites=("t1",))  # 8 frames offered
    recorder.close()
    transcript = Transcript(tmp_path / RUN)
    assert len(transcript.records()) == 5
    assert transcript.meta["skipped_budget"] == "3"
    assert verify_transcript(tmp_path / RUN).ok


def test_flipped_byte_in_a_frame_is_named(run_dir: Path):
    rec = Transcript(run_dir).records()[6]
    path = run_dir / FRAMES
    data = bytearray(path.read_bytes())
    data[rec.offset + rec.nbytes - 3] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_transcript(run_dir)
    assert not report.ok and report.first_bad == rec.seq == 7, report
    assert "frame of record 7 was edited" in report.reason


def test_edited_index_row_is_named(run_dir: Path):
    execute(run_dir, "UPDATE records SET samples = '[]' WHERE seq = 5")
    report = verify_transcript(run_dir)
    assert not report.ok and report.first_bad == 5 and "edited" in report.reason, report


def test_dropped_record_is_named(run_dir: Path):
    execute(run_dir, "DELETE FROM records WHERE seq = 4")
    report = verify_transcript(run_dir)
    assert not report.ok and report.first_bad == 4 and "removed" in report.reason, report


def test_swapped_records_are_named(run_dir: Path):
    db = sqlite3.connect(run_dir / INDEX)
    cols = [c[1] for c in db.execute("PRAGMA table_info(records)") if c[1] != "seq"]
    a = db.execute(f"SELECT {', '.join(cols)} FROM records WHERE seq = 3").fetchone()
    b = db.execute(f"SELECT {', '.join(cols)} FROM records WHERE seq = 4").fetchone()
    assign = ", ".join(f"{c} = ?" for c in cols)
    db.execute(f"UPDATE records SET {assign} WHERE seq = 3", b)
    db.execute(f"UPDATE records SET {assign} WHERE seq = 4", a)
    db.commit()
    db.close()
    report = verify_transcript(run_dir)
    assert not report.ok and report.first_bad == 3 and "does not follow" in report.reason, report


def test_inserted_record_is_named(run_dir: Path):
    db = sqlite3.connect(run_dir / INDEX)
    db.execute("UPDATE records SET seq = seq + 1000 WHERE seq >= 6")
    db.execute("UPDATE records SET seq = seq - 999 WHERE seq >= 1006")
    row = db.execute("SELECT * FROM records WHERE seq = 5").fetchone()
    db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (6, *row[1:12], "0" * 64))
    db.commit()
    db.close()
    report = verify_transcript(run_dir)
    assert not report.ok and report.first_bad == 6, report


def test_rewritten_chain_after_checkpoint_is_caught_by_the_head(run_dir: Path):
    """An attacker who recomputes every hash after an edit still contradicts the head written at the checkpoint."""
    from splitunet.transcript import genesis_hash, row_hash

    db = sqlite3.connect(run_dir / INDEX)
    db.execute("UPDATE records SET step = 99 WHERE seq = 2")
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    cols = [c[1] for c in db.execute("PRAGMA table_info(records)")]
    chain = genesis_hash(meta["run_id"], meta["run"])
    for values in db.execute("SELECT * FROM records ORDER BY seq").fetchall():
        row = dict(zip(cols, values))
        digest = row_hash(chain, row)
        db.execute("UPDATE records SET prev_hash = ?, hash = ? WHERE seq = ?", (chain, digest, row["seq"]))
        chain = digest
    db.commit()
    db.close()
    report = verify_transcript(run_dir)
    assert not report.ok and "head" in report.reason, report


def test_hmac_chain_needs_its_key(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    recorder = TranscriptRecorder(TranscriptSettings(dir=tmp_path / "t", fsync=False, every=1,
                                                     hmac_key_file=key_file))
    record_steps(recorder, range(1, 3), sites=("t1",))
    recorder.close()
    assert verify_transcript(tmp_path / "t" / RUN, key=b"s3cret-key").ok
    assert not verify_transcript(tmp_path / "t" / RUN).ok


def test_torn_last_record_is_reported_and_cut_on_reopen(run_dir: Path, tmp_path: Path):
    path = run_dir / FRAMES
    size = path.stat().st_size
    with open(path, "ab") as f:  # a crash after appending part of a frame, before indexing it
        f.write(frame(5)[:40])
    report = verify_transcript(run_dir)
    assert report.ok and report.torn_tail_bytes == 40, report
    recorder = TranscriptRecorder(TranscriptSettings(dir=tmp_path, every=1, fsync=False))
    record_steps(recorder, range(5, 6), sites=("t1",))
    recorder.close()
    report = verify_transcript(run_dir)
    assert report.ok and report.torn_tail_bytes == 0 and report.records == 18, report
    assert path.stat().st_size == size + 2 * len(frame(5))


def test_head_file_is_json(run_dir: Path):
    head = json.loads((run_dir / "head.json").read_text())
    assert head["seq"] == 16 and len(head["hash"]) == 64
