"""Reconcile two parties' records of one run: a site's transcript against the aggregator's, frame by frame.

Each party records what crossed its own boundary (:mod:`splitunet.transcript`): the site the activations it sent
and the gradients it received, the aggregator the same frames from its side, and each signs its chain heads with
its own Ed25519 key (:mod:`splitunet.signing`). :func:`reconcile`:

1. verifies each record on its own (hash chain, frames, heads; with the parties' public keys, that the heads were
   signed by them): a record that fails is named with its first bad record;
2. pairs the frames both parties should hold: the aggregator's frames of that site, in order, keeping those the
   site's recording policy also records, against the site's frames the aggregator's policy also records (the
   policies are part of each chain's anchored run description);
3. compares them pair by pair, each direction on its own (``activations`` site -> aggregator, ``gradients``
   back; within a direction both parties record in the same order, while the interleaving of the two directions
   depends on timing, e.g. under the delayed schedule), by step, phase and frame SHA-256, and names the first
   disagreement (the lowest step): an edited frame (digests differ), a dropped frame (the sequences slip), a
   reordered frame (the same frames in another order).

A party that rewrites its own record consistently (a new chain, re-signed with its own key) passes step 1; the
other party's record still disagrees with it at step 3. Who lied is not decided by two records alone; the report
says where they differ, and a third party (an ethics board) holds the public keys to check who signed what.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitunet.errors import DataError
from splitunet.recorder import Flow
from splitunet.transcript import AGGREGATOR_PARTY, Transcript, TranscriptRecord, verify_transcript

#: A frame as both parties see it: ``(step, phase, direction, frame SHA-256)``.
Frame = tuple[int, str, str, str]


@dataclass(frozen=True)
class ReconcileReport:
    """The outcome: ``ok``, or the first disagreement (``direction`` and ``index`` among that direction's paired
    frames, or ``party`` whose record failed its own verification when that is the cause, both sides' frames) and
    a sentence saying it."""

    ok: bool
    site: str
    frames: int
    reason: str = ""
    index: int | None = None
    direction: str | None = None
    party: str | None = None
    site_frame: Frame | None = None
    aggregator_frame: Frame | None = None


def _direction(record: TranscriptRecord, party: str) -> str:
    site_side = party != AGGREGATOR_PARTY
    activations = record.flow == (Flow.SENT if site_side else Flow.RECEIVED)
    return "activations" if activations else "gradients"


def _wanted(recording: dict, step: int, phase: str) -> bool:
    """Whether a party whose recording policy is ``recording`` records frames of ``(step, phase)``."""
    if not recording:
        return True  # a record without a declared policy: expect every frame
    if phase != "train":
        return bool(recording.get("record_eval"))
    every, force = int(recording.get("every") or 1), int(recording.get("force_every") or 0)
    return step % every == 0 or bool(force and step % force == 0)


def _frames(path: Path) -> tuple[str, dict, list[tuple[TranscriptRecord, Frame]]]:
    transcript = Transcript(path)
    try:
        party = str(transcript.run.get("party", AGGREGATOR_PARTY))
        recording = dict(transcript.run.get("recording") or {})
        records = transcript.records()
    finally:
        transcript.close()
    return party, recording, [(r, (r.step, r.phase, _direction(r, party), r.frame_sha256)) for r in records]


def reconcile(site_run: Path | str, aggregator_run: Path | str, *, site_public_key: str | None = None,
              aggregator_public_key: str | None = None, site_hmac: bytes | None = None,
              aggregator_hmac: bytes | None = None) -> ReconcileReport:
    """Compare a site's record of a run with the aggregator's (see the module docstring)."""
    site_party, site_policy, site_frames = _frames(Path(site_run))
    agg_party, agg_policy, agg_frames = _frames(Path(aggregator_run))
    if not site_party.startswith("site:"):
        raise DataError(f"{str(site_run)!r} is the record of {site_party!r}, not of a site")
    if agg_party != AGGREGATOR_PARTY:
        raise DataError(f"{str(aggregator_run)!r} is the record of {agg_party!r}, not of the aggregator")
    site = site_party.removeprefix("site:")
    for party, path, key, hmac_key in ((site_party, site_run, site_public_key, site_hmac),
                                       (agg_party, aggregator_run, aggregator_public_key, aggregator_hmac)):
        report = verify_transcript(path, key=hmac_key, public_key=key)
        if not report.ok:
            return ReconcileReport(ok=False, site=site, frames=0, party=party, index=report.first_bad,
                                   reason=f"the {party} record fails its own verification at record "
                                          f"{report.first_bad}: {report.reason}")
    first: ReconcileReport | None = None
    total = 0
    for direction in ("activations", "gradients"):
        ours = [f for r, f in site_frames if f[2] == direction and _wanted(agg_policy, r.step, r.phase)]
        theirs = [f for r, f in agg_frames
                  if f[2] == direction and r.site == site and _wanted(site_policy, r.step, r.phase)]
        total += len(ours)
        for index in range(max(len(ours), len(theirs))):
            a = ours[index] if index < len(ours) else None
            b = theirs[index] if index < len(theirs) else None
            if a == b:
                continue
            step = min(f[0] for f in (a, b) if f is not None)
            if first is None or step < min(f[0] for f in (first.site_frame, first.aggregator_frame) if f):
                first = ReconcileReport(ok=False, site=site, frames=index, index=index, direction=direction,
                                        site_frame=a, aggregator_frame=b,
                                        reason=_disagreement(f"{direction} frame {index}", a, b, ours[index:],
                                                             theirs[index:]))
            break
    if first is not None:
        return first
    return ReconcileReport(ok=True, site=site, frames=total,
                           reason=f"{total} frames of site {site} agree in both records")


def _show(frame: Frame | None) -> str:
    if frame is None:
        return "nothing"
    step, phase, direction, digest = frame
    return f"{phase} step {step} {direction} (sha256 {digest[:12]})"


def _disagreement(label: str, a: Frame | None, b: Frame | None, ours: list[Frame], theirs: list[Frame]) -> str:
    """Why the records differ from here on (``ours``/``theirs``: the site's and the aggregator's frames from the
    first disagreement)."""
    where = f"{label}: the site's record has {_show(a)}, the aggregator's {_show(b)}"
    if a is None or b is None:
        return f"{where}: one record ends early (frames dropped from its end)"
    if a[:3] == b[:3]:
        return f"{where}: same step and direction, different bytes (a frame was edited)"
    if sorted(ours) == sorted(theirs):
        return f"{where}: the same frames in another order (frames were reordered)"
    if a in theirs[1:]:
        return f"{where}: the site's record lacks {_show(b)} (a frame was dropped from it)"
    if b in ours[1:]:
        return f"{where}: the aggregator's record lacks {_show(a)} (a frame was dropped from it)"
    return f"{where}: the records diverge"
