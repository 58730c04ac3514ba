"""The seam for the aggregator's traffic recorder (the transcript an audit service replays and attacks).

The aggregator hands every tensor bundle it receives (site activations) and sends (gradients) to a
:class:`Recorder`, with the encoded bytes exactly as they crossed the wire. Before the bundles of a step it
announces the step's planned samples (case ids, crops, flips) with :meth:`Recorder.plan`, and once per run the
run's description (model configuration, spec without secrets) with :meth:`Recorder.start`. The default
:class:`NullRecorder` keeps nothing; :class:`splitunet.transcript.TranscriptRecorder` writes a tamper-evident
transcript.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from splitunet.data.sampling import Sample


class Flow(StrEnum):
    RECEIVED = "received"
    SENT = "sent"


@runtime_checkable
class Recorder(Protocol):
    """Receives every bundle that crosses the aggregator's boundary."""

    def start(self, *, run_id: str, meta: Mapping[str, Any]) -> None:
        """The run's description (JSON-able: model configuration, spec without secrets), once per run."""
        ...

    def plan(self, *, run_id: str, step: int, phase: str, samples: Sequence[Sample]) -> None:
        """The samples of the bundles of ``(step, phase)`` that follow (a forward's batch, in batch order)."""
        ...

    def record(self, *, run_id: str, step: int, site: str, flow: Flow, phase: str, data: bytes, sha256: str) -> None:
        """``data`` is the framed bundle (see :mod:`splitunet.wire`); ``sha256`` its frame digest."""
        ...

    def checkpoint(self, *, run_id: str, step: int) -> None:
        """The job checkpointed ``step``: a good moment to write the transcript's chain head."""
        ...

    def close(self) -> None:
        ...


class NullRecorder:
    """Records nothing (the default)."""

    def start(self, *, run_id: str, meta: Mapping[str, Any]) -> None:
        return None

    def plan(self, *, run_id: str, step: int, phase: str, samples: Sequence[Sample]) -> None:
        return None

    def record(self, *, run_id: str, step: int, site: str, flow: Flow, phase: str, data: bytes, sha256: str) -> None:
        return None

    def checkpoint(self, *, run_id: str, step: int) -> None:
        return None

    def close(self) -> None:
        return None
