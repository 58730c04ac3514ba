"""Which sites take part in each training step: site dropout, and a job that continues without a site.

**Site dropout** (``site_dropout = p``): before step ``t`` each site is left out independently with probability
``p``, never all of them, by a draw seeded by ``(seed, t)`` (:func:`splitunet.dropout.dropped_sites`), so a
replayed step (a roll-back) leaves out the same sites and the sampler's state is untouched. A site left out is
not asked to forward and gets no gradient: its encoder, optimizer and learning-rate schedule do not move. Every
online site takes part in a step that checkpoints (a site checkpoints the step it holds, so each party's
checkpoint of step ``t`` is its state after step ``t``).

**Continuing without a site** (``missing_site_policy = continue``)::

    a call to site s fails as unreachable   -> s is offline from this step on; the step goes on with the others
    before each step, s is probed            -> GET /v1/info, at most every ``probe_s`` seconds
    s answers again                          -> set the run up at s again (idempotent), restore s's encoder to
                                                its latest checkpoint, and s takes part from this step on

The steps a site missed are reported as ranges ``[first, last]`` whose updates its encoder does not reflect: from
the step after its latest checkpoint (what it trained after that was lost with the restore) to the step before it
was re-admitted. A job whose every site stops answering falls back to waiting for them (the roll-back of
:mod:`services.aggregator.recovery`). Under ``wait`` (the default) nothing here changes a step: every site takes
part, and a failure goes to the roll-back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from typing import Any, TypeVar

from services.aggregator.recovery import recoverable
from services.aggregator.site_client import SiteClient
from splitunet.dropout import dropped_sites
from splitunet.errors import PeerError
from splitunet.federation import MissingSitePolicy
from splitunet.schemas import RunSetup

logger = logging.getLogger(__name__)

#: Site subsets kept in the model card (at most 2**16 - 1 for the 16 sites a job may have).
MAX_SUBSETS = 1 << 16

T = TypeVar("T")

class SiteAttendance:
    """Who takes part in each step of one job, and what each site missed.

    Args:
        sites: the job's sites, in fusion order.
        rate: site dropout probability per site and step (0: none).
        seed: the job's seed (dropout draws are a function of ``(seed, step)``).
        policy: what to do when a site stops answering.
        probe_s: least seconds between two probes of an offline site.

    Thread-safe: the job thread updates it, request threads read :meth:`report` and :meth:`card`.
    """

    def __init__(self, sites: Sequence[str], *, rate: float = 0.0, seed: int = 0,
                 policy: MissingSitePolicy = MissingSitePolicy.WAIT, probe_s: float = 1.0) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"site dropout rate must be in [0, 1), got {rate}")
        if probe_s <= 0:
            raise ValueError(f"probe_s must be > 0, got {probe_s}")
        self.sites = list(sites)
        self.rate, self.seed, self.policy, self.probe_s = rate, seed, policy, probe_s
        self._lock = threading.Lock()
        self._offline: dict[str, int] = {}  # site -> first step it missed
        self._probed: dict[str, float] = {}
        self._probes: dict[str, Future[Any]] = {}  # probes in flight
        self._checkpoint: dict[str, int] = dict.fromkeys(self.sites, 0)  # latest step each site checkpointed
        self._missed: dict[str, list[list[int]]] = {s: [] for s in self.sites}
        self._subsets: Counter[tuple[str, ...]] = Counter()

    # ------------------------------------------------------------------ the step
    def participants(self, step: int, *, full: bool = False) -> list[str]:
        """The sites asked to forward ``step``: the online ones, less those dropout leaves out (none when
        ``full``: a step that checkpoints)."""
        with self._lock:
            online = [s for s in self.sites if s not in self._offline]
        if full:
            return online
        left_out = set(dropped_sites(self.sites, self.rate, self.seed, step))
        present = [s for s in online if s not in left_out]
        return present or online[:1]

    def tolerates(self, site: str, exc: PeerError, step: int, *, others: int) -> bool:
        """Whether the step may go on without ``site``, whose call failed with ``exc`` (``others``: sites of the
        step still answering); if so ``site`` is offline from ``step`` on."""
        if self.policy != MissingSitePolicy.CONTINUE or others < 1 or not recoverable(exc):
            return False
        with self._lock:
            self._offline.setdefault(site, step)
            self._probed[site] = time.monotonic()
        logger.warning("site %s stopped answering at step %d (%s); continuing without it", site, step, exc.message)
        return True

    def took_part(self, sites: Sequence[str]) -> None:
        """Count a finished step's subset of sites (the model card)."""
        with self._lock:
            key = tuple(s for s in self.sites if s in set(sites))
            if key in self._subsets or len(self._subsets) < MAX_SUBSETS:
                self._subsets[key] += 1

    def checkpointed(self, sites: Sequence[str], step: int) -> None:
        """``sites`` hold a checkpoint of ``step`` (what a re-admitted site is restored to)."""
        with self._lock:
            for s in sites:
                self._checkpoint[s] = step

    def online(self) -> list[str]:
        with self._lock:
            return [s for s in self.sites if s not in self._offline]

    # ------------------------------------------------------------------ re-admission
    def readmit(self, clients: Mapping[str, SiteClient], setup: RunSetup, run_id: str, step: int,
                pool: Executor) -> list[str]:
        """Re-admit, before ``step``, the offline sites that answered a probe: set the run up at each again and
        restore its encoder to its latest checkpoint; return their names. Probes (``GET /v1/info``, at most one
        per site every ``probe_s`` seconds) run in ``pool``, so a site that is still down does not hold up the
        steps of the others. A site that fails during its re-admission stays offline."""
        now = time.monotonic()
        with self._lock:
            for site in self._offline:
                if site not in self._probes and now - self._probed.get(site, 0.0) >= self.probe_s:
                    self._probed[site] = now
                    self._probes[site] = pool.submit(clients[site].info)
            done = {s: f for s, f in self._probes.items() if f.done()}
            for site in done:
                del self._probes[site]
        back = []
        for site, probe in done.items():
            if probe.exception() is not None:
                continue
            try:
                clients[site].setup_run(setup)
                restored = clients[site].restore(run_id, self._checkpoint[site]).step
            except PeerError as exc:
                logger.info("site %s answers but could not be re-admitted yet: %s", site, exc.message)
                continue
            with self._lock:
                self._offline.pop(site)
                if restored + 1 <= step - 1:
                    self._missed[site].append([restored + 1, step - 1])
            logger.info("site %s re-admitted at step %d, restored to its checkpoint of step %d", site, step, restored)
            back.append(site)
        return back

    # ------------------------------------------------------------------ reports
    def report(self, step: int) -> dict[str, Any]:
        """``JobStatus.attendance``: offline sites (since which step) and the steps each site missed."""
        with self._lock:
            missed = {s: [list(r) for r in ranges] for s, ranges in self._missed.items()}
            for s in self._offline:
                first = self._checkpoint[s] + 1
                if first <= step:
                    missed[s].append([first, step])  # still offline: missed so far
            return {
                "policy": self.policy.value,
                "offline": {s: {"since_step": first} for s, first in self._offline.items()},
                "missed_steps": {s: r for s, r in missed.items() if r},
                "missed_step_counts": {s: sum(b - a + 1 for a, b in r) for s, r in missed.items() if r},
            }

    def card(self, *, fusion: str, absent_embedding: bool) -> dict[str, Any]:
        """``JobStatus.model_card``: the sites, how absence is handled, and the subsets trained on (steps each, as
        this aggregator process ran them: steps replayed after a roll-back count again)."""
        with self._lock:
            subsets = sorted(self._subsets.items(), key=lambda kv: (-len(kv[0]), kv[0]))
        return {
            "sites": list(self.sites),
            "fusion": fusion,
            "absent_sites": ("learned per-site embedding" if absent_embedding else
                             "zeros" if fusion == "concat" else f"{fusion} renormalised over the present sites"),
            "site_dropout": self.rate,
            "missing_site_policy": self.policy.value,
            "trained_subsets": [{"sites": list(k), "steps": n} for k, n in subsets],
            "trained_for_absence": self.rate > 0 or self.policy == MissingSitePolicy.CONTINUE,
        }

    def gather(self, futures: Mapping[str, Future[T]], step: int) -> dict[str, T]:
        """The results of one call per site (``futures``), in order. Under ``wait`` the first failure is raised,
        as before; under ``continue`` the sites whose call failed as unreachable go offline and the others'
        results are returned, unless no site answered or a failure is not one to continue through (raised)."""
        if self.policy != MissingSitePolicy.CONTINUE:
            return {name: f.result() for name, f in futures.items()}
        wait(list(futures.values()))
        failed = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
        answered = len(futures) - len(failed)
        for exc in failed.values():
            if not isinstance(exc, PeerError) or answered < 1 or not recoverable(exc):
                raise exc
        for name, exc in failed.items():
            assert isinstance(exc, PeerError)
            self.tolerates(name, exc, step, others=answered)
        return {name: f.result() for name, f in futures.items() if name not in failed}

    def rejoin_all(self) -> None:
        """Every site answers again and was rolled back with the others (the ``wait`` recovery): none is offline."""
        with self._lock:
            self._offline.clear()
            self._probes.clear()

    def status_fields(self, step: int, *, fusion: str, absent_embedding: bool) -> dict[str, Any]:
        """The job status fields this tracks (``model_card``, ``attendance``) as of ``step``."""
        return {"model_card": self.card(fusion=fusion, absent_embedding=absent_embedding),
                "attendance": self.report(step)}
