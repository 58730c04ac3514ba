"""How a job survives a site that goes away: which failures are recoverable, and waiting for the site to return.

The trainer (:class:`services.aggregator.trainer.TrainingJob`) handles a recoverable failure in three moves::

    waiting_for_site   probe every site (GET /v1/info) until all answer; pause between probes doubles from
                       backoff_s to backoff_max_s; give up (job fails) after site_wait_s
    resuming           set the run up at every site again (idempotent) and roll every party back to the latest
                       step all of them checkpointed; a checkpoint found corrupt is reported and the one before used
    running            continue from that step

Steps after that checkpoint are replayed: the samples of a step come from the aggregator's sampler state, which is
in its checkpoint, so a replayed step is the step that was lost, and no party ever applies a step twice on top of
itself. The same roll-back resumes every unfinished job when the aggregator restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.aggregator.site_client import SiteClient
from splitunet.errors import PeerError

logger = logging.getLogger(__name__)

#: HTTP statuses of a site that is down or restarting (``None``: the request got no answer at all).
_UNREACHABLE = frozenset({None, 502, 503, 504})
#: Error codes of a site that lost the step in flight (it restarted): the job rolls back, then continues.
_LOST_STATE = frozenset({"out_of_order", "not_found"})


@dataclass(frozen=True)
class RecoveryPolicy:
    """Bounds of the recovery: probe backoff (seconds), how long to wait for a site, roll-backs per job."""

    site_wait_s: float = 3600.0
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    max_recoveries: int = 100

    def __post_init__(self) -> None:
        if self.site_wait_s <= 0 or self.backoff_s <= 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError("need site_wait_s > 0 and 0 < backoff_s <= backoff_max_s")
        if self.max_recoveries < 0:
            raise ValueError(f"max_recoveries must be >= 0, got {self.max_recoveries}")


def recoverable(exc: PeerError) -> bool:
    """Whether a site call's failure is one the job recovers from (site unreachable, or restarted mid-step)."""
    detail = exc.detail if isinstance(exc.detail, dict) else {}
    return unreachable(exc) or ("status" in detail and detail.get("code") in _LOST_STATE)


def unreachable(exc: PeerError) -> bool:
    """Whether a site call got no answer or a down/restarting site's 502/503/504."""
    detail = exc.detail if isinstance(exc.detail, dict) else {}
    return "status" in detail and "attempts" in detail and detail["status"] in _UNREACHABLE


def _answers(client: SiteClient) -> bool:
    try:
        client.info()
    except PeerError:
        return False
    return True


def wait_for_sites(
    clients: Mapping[str, SiteClient],
    policy: RecoveryPolicy,
    *,
    stop: threading.Event,
    on_waiting: Callable[[list[str]], None],
) -> bool:
    """Probe every site until all answer; call ``on_waiting(names)`` while some do not.

    Returns ``False`` when ``stop`` was set while waiting (the caller stops the job).

    Raises:
        PeerError: a site stayed unreachable for ``policy.site_wait_s``.
    """
    deadline = time.monotonic() + policy.site_wait_s
    delay = policy.backoff_s
    while True:
        down = [name for name, client in clients.items() if not _answers(client)]
        if not down:
            return True
        on_waiting(down)
        if time.monotonic() + delay > deadline:
            raise PeerError(
                f"site(s) {', '.join(down)} did not answer for {policy.site_wait_s:.0f} s; the job gives up "
                "(POST /v1/jobs/{id}/resume once they are back)",
                detail={"sites": down, "waited_s": policy.site_wait_s},
            )
        logger.warning("waiting for site(s) %s; next probe in %.1f s", ", ".join(down), delay)
        if stop.wait(delay):
            return False
        delay = min(policy.backoff_max_s, delay * 2)
