"""Two-sided, verifiable transcripts: each party records and signs its own side of a run; ``splitunet audit
reconcile`` compares the records frame by frame and names the first disagreement; a third party verifies the
signatures with the public keys alone.

The cheating party rewrites its own record thoroughly: a consistent new chain, its heads re-signed with its own
key (it holds it), so its record verifies on its own; only the other party's record shows the edit, drop or
reorder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from federation_testkit import AGG_TOKEN, identity_aligner, run_job
from typer.testing import CliRunner

from services.aggregator.app import create_app as create_aggregator_app
from splitunet.cli import app as cli
from splitunet.reconcile import reconcile
from splitunet.signing import IdentityKey
from splitunet.transcript import Transcript, TranscriptSettings, _RunWriter, verify_transcript
from splitunet.wire import decode_bundle, encode_bundle, frame_sha256

SPEC = {
    "sites": ["t1", "flair"],
    "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0},
    "roi": [16, 16], "batch_size": 2, "steps": 4, "val_cases": 1, "seed": 3, "run_id": "both",
    "wire": {"activations": "fp32", "gradients": "fp32"}, "checkpoint_interval": 2,
}


@pytest.fixture
def records(start_app, aggregator_settings, recording_sites, identities, tmp_path) -> dict[str, Path]:
    """A 4-step run recorded by both parties (every step), heads signed at each checkpoint."""
    settings = aggregator_settings(transcript={"enabled": True, "dir": tmp_path / "transcripts", "every": 1,
                                               "fsync": False})
    app = create_aggregator_app(settings, aligner=identity_aligner,
                                transport_factory=lambda peer: recording_sites[peer.name]._transport)
    status = run_job(start_app(app), SPEC, headers={"Authorization": f"Bearer {AGG_TOKEN}"})
    assert status["state"] == "succeeded", status
    return {"site": tmp_path / "site-t1-state" / "transcripts" / "both",
            "aggregator": tmp_path / "transcripts" / "both",
            "site_key": identities["t1"],  # SITE_IDENTITY_KEY_FILE of the test sites
            "aggregator_key": tmp_path / "aggregator-state" / "identity" / "ed25519.key"}


def _public(path: Path) -> str:
    return IdentityKey.load(path).public_key


def _rewrite(source: Path, target: Path, key_file: Path, change) -> None:
    """Rewrite ``source`` into ``target`` as its party would: ``change(list of (record, frame))`` edits the list,
    then a consistent chain is written and its head re-signed with the party's own key."""
    transcript = Transcript(source)
    items = [(r, transcript.frame(r)) for r in transcript.records()]
    run, party, run_id = dict(transcript.run), transcript.run["party"], transcript.run_id
    transcript.close()
    items = change(items)
    settings = TranscriptSettings(enabled=True, dir=target.parent, fsync=False)
    writer = _RunWriter(target, run_id, settings, None, IdentityKey.load(key_file), party)
    writer.start(run)
    for record, data in items:
        writer.append(record.step, record.site, record.flow, record.phase, record.samples, data, frame_sha256(data))
    writer.write_head(items[-1][0].step)
    writer.close()


def _edited(data: bytes) -> bytes:
    bundle = decode_bundle(data, max_bytes=2**24)
    tensors = {k: v + 1e-3 for k, v in bundle.tensors.items()}
    return encode_bundle(tensors, meta=bundle.meta, dtype=bundle.dtype, max_bytes=2**24)


def test_honest_records_agree_and_verify_with_the_public_keys_alone(records) -> None:
    site_key, agg_key = _public(records["site_key"]), _public(records["aggregator_key"])
    for name, key in (("site", site_key), ("aggregator", agg_key)):
        report = verify_transcript(records[name], public_key=key)
        assert report.ok and report.signed_heads >= 2, report
    # a head checked against the other party's key is refused: the signature names who recorded
    assert not verify_transcript(records["site"], public_key=agg_key).ok
    report = reconcile(records["site"], records["aggregator"], site_public_key=site_key,
                       aggregator_public_key=agg_key)
    assert report.ok and report.frames == 8, report  # 4 steps x (activations, gradients)
    result = CliRunner().invoke(cli, ["audit", "reconcile", str(records["site"]), str(records["aggregator"]),
                                      "--site-public-key", site_key, "--aggregator-public-key", agg_key])
    assert result.exit_code == 0 and "8 frames of site t1 agree" in result.output, result.output


@pytest.mark.parametrize("party", ["site", "aggregator"])
@pytest.mark.parametrize("cheat, words", [
    ("edit", "different bytes (a frame was edited)"),
    ("drop", "lacks train step 3 activations"),
    ("reorder", "another order (frames were reordered)"),
])
def test_a_party_that_rewrites_its_own_record_is_caught_and_named(records, tmp_path, party, cheat, words) -> None:
    site_key, agg_key = _public(records["site_key"]), _public(records["aggregator_key"])

    def target(r) -> bool:  # site t1's activations of step 3, in either record
        return r.step == 3 and r.site == "t1" and r.flow.value == ("sent" if party == "site" else "received")

    def change(items):
        index = next(i for i, (r, _) in enumerate(items) if target(r))
        if cheat == "edit":
            items[index] = (items[index][0], _edited(items[index][1]))
        elif cheat == "drop":
            del items[index]
        else:  # swap with the site's next activations (step 4)
            after = next(i for i in range(index + 1, len(items))
                         if items[i][0].site == "t1" and items[i][0].flow == items[index][0].flow)
            items[index], items[after] = items[after], items[index]
        return items

    forged = tmp_path / "forged" / "both"
    _rewrite(records[party], forged, records[f"{party}_key"], change)
    assert verify_transcript(forged, public_key=site_key if party == "site" else agg_key).ok  # it verifies alone
    pair = (forged, records["aggregator"]) if party == "site" else (records["site"], forged)
    report = reconcile(*pair, site_public_key=site_key, aggregator_public_key=agg_key)
    assert not report.ok and report.index is not None, report
    assert words in report.reason, report.reason
    # activations of steps 1-2 agree; step 3's are named (index 2 of the activation frames)
    assert report.direction == "activations" and report.index == 2, report
    result = CliRunner().invoke(cli, ["audit", "reconcile", *map(str, pair)])
    assert result.exit_code == 1 and "activations frame 2" in result.output, result.output


def test_a_naive_edit_fails_the_partys_own_verification_and_is_named(records, tmp_path) -> None:
    copy = tmp_path / "copy" / "both"
    shutil.copytree(records["site"], copy)
    transcript = Transcript(copy)
    record = [r for r in transcript.records() if r.step == 2][0]
    transcript.close()
    with open(copy / "frames.bin", "r+b") as f:  # flip a byte of a recorded frame's payload
        f.seek(record.offset + record.nbytes - 1)
        byte = f.read(1)
        f.seek(record.offset + record.nbytes - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = reconcile(copy, records["aggregator"])
    assert not report.ok and report.party == "site:t1" and report.index == record.seq, report
    assert "fails its own verification" in report.reason


def test_honest_records_of_a_delayed_schedule_agree(start_app, aggregator_settings, recording_sites, tmp_path):
    """Under the delayed schedule the next forward overlaps the last backward: the two directions interleave
    differently in the two records, and they still agree (each direction is compared on its own)."""
    settings = aggregator_settings(transcript={"enabled": True, "dir": tmp_path / "transcripts", "every": 1,
                                               "fsync": False})
    app = create_aggregator_app(settings, aligner=identity_aligner,
                                transport_factory=lambda peer: recording_sites[peer.name]._transport)
    spec = SPEC | {"run_id": "delayed", "step_schedule": "delayed"}
    status = run_job(start_app(app), spec, headers={"Authorization": f"Bearer {AGG_TOKEN}"})
    assert status["state"] == "succeeded", status
    report = reconcile(tmp_path / "site-t1-state" / "transcripts" / "delayed", tmp_path / "transcripts" / "delayed")
    assert report.ok and report.frames == 8, report
