"""The aggregator's durable record of its jobs (SQLite in ``state_dir/jobs.sqlite``).

Per job: the spec as posted (JSON; the record does not care how the spec names its sites), the last status
(state, step, losses, validations) and every step that *all* parties checkpointed. An aggregator restarted mid-job
resumes each unfinished job from the latest such step (:mod:`services.aggregator.recovery`). Weights live in the
checkpoint files of each party, never here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitunet.federation import FederationSpec, JobStatus
from splitunet.service.state_db import StateDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    digests TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""


def spec_document(spec: FederationSpec) -> dict[str, Any]:
    """The spec as JSON, so the job can be rebuilt after a restart. It holds no secret: sites are names of the
    aggregator's registry (``AGG_SITES``), whose URLs and token files are read again when the job is rebuilt."""
    return spec.model_dump(mode="json")


@dataclass(frozen=True)
class StoredJob:
    job_id: str
    spec: dict[str, Any]
    status: JobStatus
    checkpoint_steps: list[int]


class JobStore:
    """``state_dir/jobs.sqlite``: one row per job, one per complete checkpoint."""

    def __init__(self, state_dir: Path) -> None:
        self.db = StateDatabase(Path(state_dir) / "jobs.sqlite", SCHEMA)

    def create(self, job_id: str, spec: dict[str, Any], status: JobStatus) -> None:
        now = time.time()
        with self.db.transaction() as db:
            db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)",
                       (job_id, json.dumps(spec), status.model_dump_json(), now, now))
            db.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))

    def save_status(self, status: JobStatus) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, updated = ? WHERE job_id = ?",
                       (status.model_dump_json(), time.time(), status.job_id))

    def record_checkpoint(self, job_id: str, step: int, digests: dict[str, str], status: JobStatus) -> None:
        """Record that every party checkpointed ``step`` (``digests``: party -> file SHA-256), with the status."""
        with self.db.transaction() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                       (job_id, step, json.dumps(digests), time.time()))
            db.execute("UPDATE jobs SET status = ?, updated = ? WHERE job_id = ?",
                       (status.model_dump_json(), time.time(), job_id))

    def checkpoint_steps(self, job_id: str) -> list[int]:
        """Steps every party checkpointed, oldest first."""
        return [r[0] for r in self.db.query("SELECT step FROM checkpoints WHERE job_id = ? ORDER BY step", (job_id,))]

    def jobs(self) -> list[StoredJob]:
        """Every recorded job, oldest first."""
        rows = self.db.query("SELECT job_id, spec, status FROM jobs ORDER BY created")
        return [StoredJob(job_id, json.loads(spec), JobStatus.model_validate_json(status),
                          self.checkpoint_steps(job_id)) for job_id, spec, status in rows]

    def close(self) -> None:
        self.db.close()
