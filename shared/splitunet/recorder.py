"""The seam for the aggregator's traffic recorder (the transcript an audit service replays and attacks).

The aggregator hands every tensor bundle it receives (site activations) and sends (gradients) to a
:class:`Recorder`, with the encoded bytes exactly as they crossed the wire. The default :class:`NullRecorder`
keeps nothing; a tamper-evident transcript writer implements the same protocol.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol, runtime_checkable


class Flow(StrEnum):
    RECEIVED = "received"
    SENT = "sent"


@runtime_checkable
class Recorder(Protocol):
    """Receives every bundle that crosses the aggregator's boundary."""

    def record(self, *, run_id: str, step: int, site: str, flow: Flow, phase: str, data: bytes, sha256: str) -> None:
        """``data`` is the framed bundle (see :mod:`splitunet.wire`); ``sha256`` its frame digest."""
        ...

    def close(self) -> None:
        ...


class NullRecorder:
    """Records nothing (the default)."""

    def record(self, *, run_id: str, step: int, site: str, flow: Flow, phase: str, data: bytes, sha256: str) -> None:
        return None

    def close(self) -> None:
        return None
