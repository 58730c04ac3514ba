"""The site's durable record of its runs: the setup of each run and its latest checkpoint (SQLite).

A site restarted mid-run rebuilds every recorded run from its setup and waits for the aggregator to restore a
checkpointed step (:meth:`SiteRuntime.restore <services.client_site.runtime.SiteRuntime.restore>`); the weights
themselves live in the checkpoint files, never in the database.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from splitunet.schemas import RunSetup
from splitunet.service.state_db import StateDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    setup TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL,
    cohort TEXT NOT NULL DEFAULT '[]',
    checkpoint_step INTEGER,
    checkpoint_path TEXT,
    checkpoint_sha256 TEXT
);
"""


@dataclass(frozen=True)
class StoredRun:
    """A run as recorded: its setup, its aligned cohort, when it was created and its latest checkpoint (if any)."""

    setup: RunSetup
    fingerprint: str
    created: float
    cohort: frozenset[str]
    checkpoint_step: int | None
    checkpoint_path: Path | None
    checkpoint_sha256: str | None


class RunStore:
    """``state_dir/runs.sqlite``: one row per run."""

    def __init__(self, state_dir: Path) -> None:
        self.db = StateDatabase(Path(state_dir) / "runs.sqlite", SCHEMA)

    def save_run(
        self, setup: RunSetup, fingerprint: str, created: float | None = None, *, cohort: frozenset[str] = frozenset()
    ) -> None:
        """Record a run with the aligned cohort it was set up with (the cases it may serve after a restart)."""
        with self.db.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (run_id, setup, fingerprint, created, cohort) VALUES (?, ?, ?, ?, ?)",
                (setup.run_id, setup.model_dump_json(), fingerprint, created or time.time(),
                 json.dumps(sorted(cohort))),
            )

    def delete_run(self, run_id: str) -> None:
        with self.db.transaction() as db:
            db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def record_checkpoint(self, run_id: str, step: int, path: Path, sha256: str) -> None:
        with self.db.transaction() as db:
            db.execute(
                "UPDATE runs SET checkpoint_step = ?, checkpoint_path = ?, checkpoint_sha256 = ? WHERE run_id = ?",
                (step, str(path), sha256, run_id),
            )

    def runs(self) -> list[StoredRun]:
        """Every recorded run, oldest first."""
        rows = self.db.query(
            "SELECT setup, fingerprint, created, cohort, checkpoint_step, checkpoint_path, checkpoint_sha256 "
            "FROM runs ORDER BY created"
        )
        return [
            StoredRun(RunSetup.model_validate_json(setup), fingerprint, created, frozenset(json.loads(cohort)), step,
                      Path(path) if path else None, digest)
            for setup, fingerprint, created, cohort, step, path, digest in rows
        ]

    def close(self) -> None:
        self.db.close()
