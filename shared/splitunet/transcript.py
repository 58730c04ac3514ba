"""A tamper-evident transcript of the traffic the aggregator saw: frames on disk, an index in SQLite, a hash chain.

One folder per run::

    <dir>/<run_id>/frames.bin      every recorded bundle frame, exactly as it crossed the wire, appended
    <dir>/<run_id>/index.sqlite    one row per frame: step, site, flow, phase, the planned samples (case ids,
                                   crops, flips), tensor names and shapes, offset, size, frame SHA-256,
                                   the previous row's hash and this row's hash
    <dir>/<run_id>/head.json       the chain head (last sequence number and hash), rewritten at every checkpoint

Hash chain: ``h_0 = H("splitunet-transcript/1", run_id, run meta)``, ``h_i = H(h_{i-1}, row_i)`` over the canonical
JSON of row ``i``; ``H`` is SHA-256, or HMAC-SHA256 when a key is configured (then nobody without the key can
rebuild a consistent chain after an edit). :func:`verify_transcript` recomputes the chain, rereads every frame and
compares the chain with the last written head; it names the first bad record: an edited row or frame (hash or
frame digest differs), a removed, reordered or inserted row (sequence gap or a ``prev_hash`` that is not its
predecessor's hash), records cut after a written head.

Writes are ordered so a crash leaves at most a torn tail: a frame is appended and flushed (``fsync``) before its
row is committed, and ``head.json`` is replaced atomically (write, fsync, rename). Frame bytes past the last
indexed record are such a torn record: :func:`verify_transcript` reports them without failing and the recorder
cuts them when it reopens the run.

Bounded: train steps are recorded every ``every`` steps and always at the steps a privacy gate audits; evaluation
forwards on request (``record_eval``); past ``max_bytes`` of frames nothing more is recorded (counted, logged once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from splitunet.data.sampling import Sample
from splitunet.errors import DataError, WireFormatError
from splitunet.recorder import Flow
from splitunet.signing import IdentityKey, verify
from splitunet.wire import DEFAULT_MAX_BYTES, decode_bundle, frame_sha256, unpack_frame

logger = logging.getLogger(__name__)

FORMAT = "splitunet-transcript/1"
FRAMES, INDEX, HEAD = "frames.bin", "index.sqlite", "head.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, step INTEGER NOT NULL, site TEXT NOT NULL, flow TEXT NOT NULL, phase TEXT NOT NULL,
    samples TEXT NOT NULL, tensors TEXT NOT NULL, dtype TEXT NOT NULL, offset INTEGER NOT NULL,
    nbytes INTEGER NOT NULL, frame_sha256 TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (seq INTEGER NOT NULL, step INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS signed_heads (
    seq INTEGER NOT NULL, step INTEGER NOT NULL, hash TEXT NOT NULL, party TEXT NOT NULL, public_key TEXT NOT NULL,
    signature TEXT NOT NULL
);
"""
_FIELDS = ("seq", "step", "site", "flow", "phase", "samples", "tensors", "dtype", "offset", "nbytes", "frame_sha256")


class TranscriptSettings(BaseModel):
    """The aggregator's transcript (``AGG_TRANSCRIPT__ENABLED=true``, ``AGG_TRANSCRIPT__EVERY=10``, ...).

    Args:
        enabled: record the traffic (off by default in the service, on in the demo).
        dir: the transcripts' folder (one subfolder per run).
        every: record train step ``s`` when ``s % every == 0`` (1: every step).
        record_eval: also record evaluation forwards (validation and inference: whole cases, large; off by
            default — the privacy gate audits the train steps it forces into the transcript).
        max_bytes: stop recording once the frames of a run would exceed this many bytes.
        fsync: flush every frame to disk before indexing it (crash safety; off only for tests or benchmarks).
        hmac_key_file: a secret key file; the chain then uses HMAC-SHA256 (verification needs the key).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    dir: Path = Path("transcripts")
    every: int = Field(default=10, ge=1)
    record_eval: bool = False
    max_bytes: int = Field(default=4 * 2**30, gt=0)
    fsync: bool = True
    hmac_key_file: Path | None = None

    def key(self) -> bytes | None:
        if self.hmac_key_file is None:
            return None
        from splitunet.service.settings import read_secret_file

        return read_secret_file(self.hmac_key_file)[0].encode()


#: The aggregator's transcripts name their party so; a site's is ``site:<name>``.
AGGREGATOR_PARTY = "aggregator"


def site_party(site: str) -> str:
    return f"site:{site}"


def check_party(party: str) -> str:
    if party != AGGREGATOR_PARTY and not (party.startswith("site:") and len(party) > 5):
        raise ValueError(f"a transcript's party is 'aggregator' or 'site:<name>', got {party!r}")
    return party


def activation_flows(run: Mapping[str, Any]) -> tuple[Flow, Flow]:
    """``(flow of the activation frames, flow of the gradient frames)`` in a transcript whose run description is
    ``run``: a site sent its activations and received gradients; the aggregator the reverse (a transcript written
    before parties were recorded is the aggregator's)."""
    party = str(run.get("party", AGGREGATOR_PARTY))
    return (Flow.SENT, Flow.RECEIVED) if party.startswith("site:") else (Flow.RECEIVED, Flow.SENT)


def _hash(key: bytes | None, *parts: str) -> str:
    message = "\n".join(parts).encode()
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def genesis_hash(run_id: str, meta_json: str, key: bytes | None = None) -> str:
    return _hash(key, FORMAT, run_id, meta_json)


def row_hash(prev_hash: str, row: Mapping[str, Any], key: bytes | None = None) -> str:
    return _hash(key, prev_hash, _canonical({k: row[k] for k in _FIELDS}))


def head_message(run_id: str, party: str, seq: int, step: int, digest: str) -> bytes:
    """What a party signs at a chain head: the run, the party, and the chain hash after ``seq`` records."""
    return _canonical({"format": FORMAT, "run_id": run_id, "party": party, "seq": seq, "step": step,
                       "hash": digest}).encode()


def run_description(spec: Any, config: Any) -> dict[str, Any]:
    """What a transcript needs to replay a run: the model configuration and the sampling geometry, no secrets.

    ``spec`` is a :class:`~splitunet.federation.FederationSpec`, ``config`` its built
    :class:`~splitunet.config.SplitUNetConfig`.
    """
    return {
        "model": config.model_dump(mode="json"),
        "sites": list(spec.sites),
        "roi": list(spec.roi),
        "batch_size": spec.batch_size,
        "resize_slices": spec.resize_slices,
        "seed": spec.seed,
        "wire": spec.wire.model_dump(mode="json"),
        # the fixed-point parameters decode the recorded masked bundles' sum (the audit attacks the sum)
        "secure_sum": None if spec.secure_sum is None else spec.secure_sum.model_dump(mode="json"),
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class TranscriptRecord:
    """One indexed frame. ``samples`` are the planned samples of its batch; ``tensors`` ``{name: shape}``."""

    seq: int
    step: int
    site: str
    flow: Flow
    phase: str
    samples: tuple[Sample, ...]
    tensors: dict[str, list[int]]
    dtype: str
    offset: int
    nbytes: int
    frame_sha256: str


class _RunWriter:
    """The open transcript of one run (under the recorder's lock)."""

    def __init__(self, root: Path, run_id: str, settings: TranscriptSettings, key: bytes | None,
                 signer: IdentityKey | None = None, party: str = AGGREGATOR_PARTY) -> None:
        self.signer, self.party = signer, party
        self.root = root
        self.run_id = run_id
        self.settings = settings
        self.key = key
        root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(root / INDEX, check_same_thread=False, isolation_level=None)
        self.db.executescript(_SCHEMA)
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if "run_id" not in meta:
            self._set_meta({"format": FORMAT, "run_id": run_id, "run": "{}", "skipped_budget": "0"})
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        self.skipped = int(meta.get("skipped_budget", "0"))
        last = self.db.execute("SELECT seq, hash, offset, nbytes FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        self.seq, self.hash, end = (0, genesis_hash(run_id, meta["run"], key), 0) if last is None else (
            last[0], last[1], last[2] + last[3])
        self.frames = open(root / FRAMES, "ab")  # noqa: SIM115 - kept open while the run records
        if self.frames.tell() > end:  # a frame appended but never indexed: the torn tail of a crash
            logger.warning("transcript %s: cutting a torn tail of %d bytes", run_id, self.frames.tell() - end)
            self.frames.truncate(end)
            self.frames.seek(end)
        self.size = end

    def _set_meta(self, values: Mapping[str, str]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    def start(self, meta: Mapping[str, Any]) -> None:
        if self.seq:
            return  # a resumed run keeps its first description (it anchors the chain)
        run = _canonical(dict(meta))
        self._set_meta({"run": run})
        self.hash = genesis_hash(self.run_id, run, self.key)

    def append(self, step: int, site: str, flow: Flow, phase: str, samples: Sequence[Sample], data: bytes,
               sha256: str) -> None:
        if self.size + len(data) > self.settings.max_bytes:
            self.skipped += 1
            if self.skipped == 1:
                logger.warning("transcript %s: disk budget of %d bytes reached; not recording any more frames",
                               self.run_id, self.settings.max_bytes)
            self._set_meta({"skipped_budget": str(self.skipped)})
            return
        bundle = decode_bundle(data, max_bytes=max(len(data), DEFAULT_MAX_BYTES), as_float32=False)
        row = {
            "seq": self.seq + 1, "step": step, "site": site, "flow": flow.value, "phase": phase,
            "samples": _canonical([s.model_dump(mode="json") for s in samples]),
            "tensors": _canonical({k: list(v.shape) for k, v in bundle.tensors.items()}),
            "dtype": bundle.dtype.value, "offset": self.size, "nbytes": len(data), "frame_sha256": sha256,
        }
        self.frames.write(data)
        self.frames.flush()
        if self.settings.fsync:
            os.fsync(self.frames.fileno())
        digest = row_hash(self.hash, row, self.key)
        self.db.execute(
            f"INSERT INTO records ({', '.join(_FIELDS)}, prev_hash, hash) VALUES ({', '.join('?' * 13)})",
            [*(row[k] for k in _FIELDS), self.hash, digest],
        )
        self.seq, self.hash, self.size = self.seq + 1, digest, self.size + len(data)

    def write_head(self, step: int) -> None:
        self.db.execute("INSERT INTO heads (seq, step, hash) VALUES (?, ?, ?)", (self.seq, step, self.hash))
        head = {"format": FORMAT, "run_id": self.run_id, "seq": self.seq, "step": step, "hash": self.hash}
        if self.signer is not None:
            signature = self.signer.sign(head_message(self.run_id, self.party, self.seq, step, self.hash))
            self.db.execute("INSERT INTO signed_heads (seq, step, hash, party, public_key, signature) VALUES "
                            "(?, ?, ?, ?, ?, ?)", (self.seq, step, self.hash, self.party, self.signer.public_key,
                                                   signature))
            head |= {"party": self.party, "public_key": self.signer.public_key, "signature": signature}
        _atomic_write(self.root / HEAD, _canonical(head))

    def close(self) -> None:
        self.frames.close()
        self.db.close()


class TranscriptRecorder:
    """A :class:`~splitunet.recorder.Recorder` writing one transcript per run under ``settings.dir``.

    Args:
        settings: where and what to record.
        force_every: also record every train step ``s`` with ``s % force_every == 0`` (a privacy gate's steps).
        party: whose record this is: ``aggregator`` or ``site:<name>``. Flows are the party's own: a site's
            activations are ``sent``, the aggregator's ``received`` (see :func:`activation_flows`).
        signer: the party's identity key: it signs every chain head written (:mod:`splitunet.signing`), so a third
            party holding only the public key can check who recorded what (:func:`verify_transcript`).
    """

    def __init__(self, settings: TranscriptSettings, *, force_every: int = 0, party: str = AGGREGATOR_PARTY,
                 signer: IdentityKey | None = None) -> None:
        if force_every < 0:
            raise ValueError(f"force_every must be >= 0 (0: none), got {force_every}")
        check_party(party)
        self.settings = settings
        self.force_every = force_every
        self.party = party
        self.signer = signer
        self._key = settings.key()
        self._runs: dict[str, _RunWriter] = {}
        self._plans: dict[str, tuple[int, str, tuple[Sample, ...]]] = {}
        self._lock = threading.Lock()

    def run_dir(self, run_id: str) -> Path:
        return Path(self.settings.dir) / run_id

    def _writer(self, run_id: str) -> _RunWriter:
        if run_id not in self._runs:
            self._runs[run_id] = _RunWriter(self.run_dir(run_id), run_id, self.settings, self._key, self.signer,
                                            self.party)
        return self._runs[run_id]

    def wanted(self, step: int, phase: str) -> bool:
        """Whether bundles of ``(step, phase)`` are recorded."""
        if phase != "train":
            return self.settings.record_eval
        return step % self.settings.every == 0 or bool(self.force_every and step % self.force_every == 0)

    def start(self, *, run_id: str, meta: Mapping[str, Any]) -> None:
        """Anchor the run's chain on its description plus who records and what (both sides of a reconcile read
        the other's recording policy from here, inside the chain)."""
        recording = {"every": self.settings.every, "force_every": self.force_every,
                     "record_eval": self.settings.record_eval}
        with self._lock:
            self._writer(run_id).start({**meta, "party": self.party, "recording": recording})

    def plan(self, *, run_id: str, step: int, phase: str, samples: Sequence[Sample]) -> None:
        with self._lock:
            self._plans[run_id] = (step, phase, tuple(samples))

    def record(self, *, run_id: str, step: int, site: str, flow: Flow, phase: str, data: bytes, sha256: str) -> None:
        if not self.wanted(step, phase):
            return
        with self._lock:
            planned = self._plans.get(run_id)
            samples = planned[2] if planned is not None and planned[:2] == (step, phase) else ()
            self._writer(run_id).append(step, site, Flow(flow), phase, samples, data, sha256)

    def checkpoint(self, *, run_id: str, step: int) -> None:
        with self._lock:
            self._writer(run_id).write_head(step)

    def close(self) -> None:
        with self._lock:
            for run_id, writer in self._runs.items():
                writer.write_head(writer.seq and self._last_step(writer))
                writer.close()
                logger.info("transcript %s closed: %d records", run_id, writer.seq)
            self._runs.clear()

    @staticmethod
    def _last_step(writer: _RunWriter) -> int:
        row = writer.db.execute("SELECT step FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return 0 if row is None else int(row[0])


# ---------------------------------------------------------------------------------------------------- reading
class Transcript:
    """Read access to one run's transcript folder (the audit's input). Use :func:`verify_transcript` first."""

    def __init__(self, run_dir: Path | str) -> None:
        self.root = Path(run_dir)
        if not (self.root / INDEX).is_file() or not (self.root / FRAMES).is_file():
            raise DataError(f"{str(self.root)!r} is not a transcript folder (no {INDEX} and {FRAMES}); "
                            "pass the folder of one run, <AGG_TRANSCRIPT__DIR>/<run_id>")
        self.db = sqlite3.connect(f"file:{self.root / INDEX}?mode=ro", uri=True, check_same_thread=False)
        self.meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        self.run_id = self.meta.get("run_id", "")
        self.run: dict[str, Any] = json.loads(self.meta.get("run", "{}"))

    def records(self, *, step: int | None = None, site: str | None = None, flow: Flow | None = None,
                phase: str | None = None) -> list[TranscriptRecord]:
        rows = self.db.execute(f"SELECT {', '.join(_FIELDS)} FROM records ORDER BY seq").fetchall()
        out = []
        for row in rows:
            r = dict(zip(_FIELDS, row))
            if (step is not None and r["step"] != step) or (site is not None and r["site"] != site) or (
                    flow is not None and r["flow"] != flow.value) or (phase is not None and r["phase"] != phase):
                continue
            out.append(TranscriptRecord(
                seq=r["seq"], step=r["step"], site=r["site"], flow=Flow(r["flow"]), phase=r["phase"],
                samples=tuple(Sample.model_validate(s) for s in json.loads(r["samples"])),
                tensors=json.loads(r["tensors"]), dtype=r["dtype"], offset=r["offset"], nbytes=r["nbytes"],
                frame_sha256=r["frame_sha256"],
            ))
        return out

    def frame(self, record: TranscriptRecord) -> bytes:
        with open(self.root / FRAMES, "rb") as f:
            f.seek(record.offset)
            data = f.read(record.nbytes)
        if len(data) != record.nbytes or frame_sha256(data) != record.frame_sha256:
            raise DataError(f"frame of record {record.seq} is damaged; run `splitunet audit verify {self.root}`")
        return data

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_transcript` found. ``first_bad`` is the sequence number of the first bad record."""

    ok: bool
    records: int
    first_bad: int | None = None
    reason: str = ""
    torn_tail_bytes: int = 0
    head_seq: int | None = None
    signed_heads: int = 0


def verify_transcript(run_dir: Path | str, *, key: bytes | None = None, public_key: str | None = None) -> VerifyReport:
    """Recompute the hash chain, reread every frame and check the written heads (see the module docstring).

    Signed heads are checked too: each signature against its record's chain hash. With ``public_key`` (the
    recording party's, pinned out of band) the transcript must carry at least one head signed by that key and no
    head signed by another: a third party verifies who recorded what with the public key alone."""
    root = Path(run_dir)
    transcript = Transcript(root)
    try:
        db = transcript.db
        meta = transcript.meta
        rows = [dict(zip((*_FIELDS, "prev_hash", "hash"), r)) for r in db.execute(
            f"SELECT {', '.join(_FIELDS)}, prev_hash, hash FROM records ORDER BY rowid").fetchall()]
        heads = db.execute("SELECT seq, step, hash FROM heads ORDER BY rowid").fetchall()
        signed = db.execute("SELECT seq, step, hash, party, public_key, signature FROM signed_heads "
                            "ORDER BY rowid").fetchall() if _has_table(db, "signed_heads") else []
    finally:
        transcript.close()
    run_id = meta.get("run_id", "")
    for seq, step, digest, party, key_hex, signature in signed:
        if not verify(key_hex, head_message(run_id, party, seq, step, digest), signature):
            return VerifyReport(ok=False, records=len(rows), first_bad=seq, reason=(
                f"the head signed at step {step} (record {seq}) does not carry a valid signature of {party}"))
        if public_key is not None and key_hex != public_key:
            return VerifyReport(ok=False, records=len(rows), first_bad=seq, reason=(
                f"the head at step {step} (record {seq}) was signed by key {key_hex[:16]}..., not the pinned key "
                f"{public_key[:16]}..."))
        heads.append((seq, step, digest))
    if public_key is not None and not signed:
        return VerifyReport(ok=False, records=len(rows), reason="no signed chain head: the record cannot be "
                            "attributed to the pinned key")
    head_file = root / HEAD
    if head_file.is_file():
        doc = json.loads(head_file.read_text())
        heads.append((doc["seq"], doc["step"], doc["hash"]))
    chain = genesis_hash(meta.get("run_id", ""), meta.get("run", "{}"), key)
    hashes: dict[int, str] = {0: chain}
    frames_size = (root / FRAMES).stat().st_size
    with open(root / FRAMES, "rb") as frames:
        for index, row in enumerate(rows, start=1):
            seq = row["seq"]

            def bad(reason: str, at: int = seq) -> VerifyReport:
                return VerifyReport(ok=False, records=len(rows), first_bad=at, reason=reason)

            if seq != index:
                what = "removed" if seq > index else "inserted or reordered"
                return bad(f"record {index} is missing or out of order (found seq {seq}): a record was {what}",
                           index)
            if row["prev_hash"] != chain:
                return bad(f"record {seq} does not follow record {seq - 1} (prev_hash differs): a record was "
                           "inserted, removed or reordered")
            if row_hash(chain, row, key) != row["hash"]:
                return bad(f"record {seq} was edited (its hash does not match its fields)")
            end = row["offset"] + row["nbytes"]
            if end > frames_size:
                if index == len(rows) and not any(h[0] >= seq for h in heads):
                    return VerifyReport(ok=True, records=len(rows) - 1, reason=f"record {seq} is torn (its frame "
                                        "is incomplete); the recorder cuts it when it reopens the run",
                                        torn_tail_bytes=frames_size - row["offset"])
                return bad(f"the frame of record {seq} is truncated (frames.bin ends at {frames_size})")
            frames.seek(row["offset"])
            data = frames.read(row["nbytes"])
            try:
                unpack_frame(data, max_bytes=max(len(data), DEFAULT_MAX_BYTES))
                if frame_sha256(data) != row["frame_sha256"]:
                    raise WireFormatError("the frame digest differs from the index")
            except WireFormatError as exc:
                return bad(f"the frame of record {seq} was edited: {exc.message}")
            chain = row["hash"]
            hashes[seq] = chain
    last_seq = len(rows)
    for seq, step, digest in heads:
        if seq > last_seq:
            return VerifyReport(ok=False, records=len(rows), first_bad=last_seq + 1, reason=(
                f"the head written at step {step} covers {seq} records but only {last_seq} remain: records were "
                "removed from the end"), head_seq=seq)
        if hashes.get(seq) != digest:
            return VerifyReport(ok=False, records=len(rows), first_bad=seq, reason=(
                f"the chain was rewritten: record {seq} differs from the head written at step {step}"), head_seq=seq)
    tail = frames_size - (rows[-1]["offset"] + rows[-1]["nbytes"] if rows else 0)
    return VerifyReport(ok=True, records=len(rows), torn_tail_bytes=max(tail, 0),
                        reason="torn tail (cut when the recorder reopens the run)" if tail > 0 else "",
                        head_seq=heads[-1][0] if heads else None, signed_heads=len(signed))


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None
