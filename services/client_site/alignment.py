"""Binding the aligned cohort to the caller's own PSI session: the site answers "is this patient here?" only
through the private set intersection.

The aggregator learns the intersection from the PSI (:mod:`splitunet.psi`) and then tells the site the aligned
ids. Without a binding, ``POST /v1/alignment`` would be a membership oracle: send ``["BraTS-00042"]``, see
whether it is accepted. :class:`AlignmentGuard` allows an alignment only

- from the caller (same credential) that ran the PSI session it names, and only for that caller's latest
  session, once, within ``max_age_s``;
- with at most as many ids as the caller's PSI set had (it cannot align more than it could have matched);
- with ids that are all the site's own; otherwise one uniform refusal that says neither which nor how many ids
  are unknown.

What is left: the caller could have put guessed ids in its PSI set (inherent to any PSI; the PSI set size is
bounded), and the alignment's accept/refuse says whether *all* its ids are here, which the PSI it just ran had
told it already. The aligned cohort of a run is fixed when the run is set up (a later alignment never replaces
it), and forwards for a case outside it all get the same :class:`~splitunet.errors.NotAlignedError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from splitunet.errors import NotAlignedError, PolicyError
from splitunet.psi import PsiRequest, PsiResponse, PsiServer
from splitunet.schemas import AlignedCases


@dataclass(frozen=True)
class _Session:
    session: str
    client_elements: int
    started: float


class AlignmentGuard:
    """Answers PSI requests and accepts only alignments bound to them (see the module docstring).

    Args:
        case_ids: the site's case ids.
        max_age_s: how long after its PSI session an alignment is accepted.
        clock: monotonic seconds (tests inject one).
    """

    def __init__(
        self, case_ids: frozenset[str], *, max_age_s: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")
        self.case_ids = frozenset(case_ids)
        self.max_age_s = max_age_s
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def psi(self, caller: str, request: PsiRequest) -> PsiResponse:
        """Answer one PSI request with a fresh secret; remember it as ``caller``'s latest session."""
        response = PsiServer(sorted(self.case_ids)).respond(request)
        with self._lock:
            self._sessions[caller] = _Session(request.session, len(request.elements), self._clock())
        return response

    def accept(self, caller: str, aligned: AlignedCases) -> frozenset[str]:
        """The cohort of an alignment bound to ``caller``'s latest PSI session (consumed); else 403."""
        with self._lock:
            record = self._sessions.get(caller)
            fresh = record is not None and self._clock() - record.started <= self.max_age_s
            if not fresh or record is None or record.session != aligned.session:
                raise PolicyError(
                    "the alignment must follow your own latest PSI session with this site (POST /v1/psi), name "
                    "its session and be sent within its lifetime; run the PSI again",
                    detail={"rule": "alignment_after_psi"},
                )
            del self._sessions[caller]  # one alignment per PSI session
        ids = frozenset(aligned.case_ids)
        if len(ids) > record.client_elements or not ids <= self.case_ids:
            raise PolicyError(
                "the alignment is not a subset of the intersection of your PSI session; run the PSI again",
                detail={"rule": "alignment_is_intersection"},
            )
        return ids


def not_aligned(case_id: str) -> NotAlignedError:
    """The one error of a forward for any case outside the run's aligned cohort (unknown or not aligned)."""
    return NotAlignedError(
        "the case is not in the aligned cohort of this run; align the cases with PSI before the run is set up",
        detail={"case_id": case_id},
    )
