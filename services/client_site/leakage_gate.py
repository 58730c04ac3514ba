"""The data owner's leakage gate: the site checks what it sent with its own audit before the next activations leave.

Every ``policy.leakage.every``-th train step ``s`` is recorded in the site's own transcript (and its weights kept).
Before the site releases any later forward of the run (train or eval), it attacks step ``s`` on its own premises
(:mod:`splitunet.auditing.site_local`: by default the white-box inversion with its own weights, scored against
its own originals) and compares the best attack's figures with its thresholds::

    brain SSIM            > max_ssim          (both images on [0, 1], inside the brain)
    SSIM - prior SSIM     > max_delta_ssim    (what the attack learned beyond the public prior image)
    semantic leakage      > max_semantic      (Dice of a frozen WT segmenter on the reconstruction vs the original)

Over a threshold the site stops releasing features of that run: every forward is refused with 403
``policy_violation``, ``detail.rule = "leakage"`` and the figure in ``detail``; ``GET /v1/info`` shows the decision
(``leakage_gate``) and ``/metrics`` the figures (``splitunet_site_leakage{run, figure}``) and the stop
(``splitunet_site_leakage_stopped{run}``). The decision is kept in ``<state_dir>/leakage-gate/<run>.json`` so a
restart does not lift it; the site's operator lifts it by deleting that file (after strengthening the site's
defenses) and restarting the site. The aggregator, refused, pauses its job naming the site and the figure.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from services.client_site.policy import LeakagePolicy
from splitunet.attacks.base import AttackKind
from splitunet.auditing.runner import AttackBudgets, Finding
from splitunet.auditing.site_local import SiteAuditRequest, SiteLocalAudit
from splitunet.errors import PolicyError
from splitunet.schemas import ForwardRequest, Phase
from splitunet.service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


def evaluate(policy: LeakagePolicy, findings: list[Finding]) -> dict[str, Any] | None:
    """The first finding over one of the policy's thresholds, as a decision; ``None`` if all are within."""
    for f in findings:
        delta = None if f.ssim is None or f.prior_ssim is None else f.ssim - f.prior_ssim
        for figure, value, limit in (("ssim", f.ssim, policy.max_ssim),
                                     ("delta_ssim", delta, policy.max_delta_ssim),
                                     ("semantic", f.semantic, policy.max_semantic)):
            if limit is not None and value is not None and value > limit:
                return {"figure": figure, "value": value, "threshold": limit, "attack": f.attack.value,
                        "step": f.step}
    return None


class LeakageGate:
    """One site's leakage gate over all its runs (see the module docstring). Thread-safe.

    Args:
        policy: the site's leakage thresholds and interval.
        audit: the site's own audit (its transcript, snapshots and data).
        site: the site's name.
        state_dir: where stop decisions are kept across restarts.
        metrics: the service's metrics (gauges of the figures and of the stop).
    """

    def __init__(self, policy: LeakagePolicy, audit: SiteLocalAudit, site: str, state_dir: Path,
                 metrics: ServiceMetrics | None = None) -> None:
        self.policy, self.audit, self.site = policy, audit, site
        self.folder = Path(state_dir) / "leakage-gate"
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._checked: dict[str, dict[str, Any]] = {}
        self._stopped: dict[str, dict[str, Any]] = {}
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            self._stopped[path.stem] = json.loads(path.read_text())
        self._figure = self._stop = None
        if metrics is not None:
            self._figure = metrics.gauge("site_leakage", "The site gate audit: best attack figure", ["run", "figure"])
            self._stop = metrics.gauge("site_leakage_stopped", "1 when the site's gate stopped a run", ["run"])
            for run_id in self._stopped:
                self._stop.labels(run=run_id).set(1.0)

    @property
    def active(self) -> bool:
        return bool(self.policy.every)

    def recorded(self, run_id: str, request: ForwardRequest) -> None:
        """A forward was recorded: a gate step becomes due before the next forward of the run."""
        if self.active and request.phase == Phase.TRAIN and request.step > 0 and request.step % self.policy.every == 0:
            with self._lock:
                self._pending[run_id] = max(request.step, self._pending.get(run_id, 0))

    def before_forward(self, run_id: str, request: ForwardRequest) -> None:
        """Refuse if the run was stopped; audit a due step first (this blocks the forward, on purpose)."""
        self._refuse_if_stopped(run_id)
        with self._lock:
            due = self._pending.get(run_id)
        if due is None or due >= request.step and request.phase == Phase.TRAIN:
            return  # nothing due, or a retry of the gate step's own forward
        self.check(run_id, due)
        self._refuse_if_stopped(run_id)

    def check(self, run_id: str, step: int) -> dict[str, Any]:
        """Audit ``step`` of ``run_id`` now; stop the run when a figure is over its threshold. The decision."""
        policy = self.policy
        request = SiteAuditRequest(
            steps=[step], attacks=[AttackKind(a) for a in policy.attacks], max_samples=policy.max_samples,
            budgets=AttackBudgets(whitebox_iterations=policy.whitebox_iterations,
                                  segmenter_steps=policy.segmenter_steps if policy.max_semantic is not None else 0))
        result, _ = self.audit.run(run_id, request)
        over = evaluate(policy, result.findings)
        best = max((f for f in result.findings if f.ssim is not None), key=lambda f: f.ssim, default=None)
        decision = {"rule": "leakage", "site": self.site, "run_id": run_id, "step": step, "passed": over is None,
                    **(over or {}), "best_ssim": None if best is None else best.ssim,
                    "best_prior_ssim": None if best is None else best.prior_ssim}
        if self._figure is not None and best is not None:
            self._figure.labels(run=run_id, figure="ssim").set(best.ssim)
            if best.prior_ssim is not None:
                self._figure.labels(run=run_id, figure="delta_ssim").set(best.ssim - best.prior_ssim)
            if best.semantic is not None:
                self._figure.labels(run=run_id, figure="semantic").set(best.semantic)
        with self._lock:
            if self._pending.get(run_id) == step:
                del self._pending[run_id]
            self._checked[run_id] = decision
            if over is not None:
                self._stopped[run_id] = decision
        if over is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"{run_id}.json").write_text(json.dumps(decision))
            if self._stop is not None:
                self._stop.labels(run=run_id).set(1.0)
            logger.warning("site %s stops releasing run %s: its own %s attack on step %d reached %s %.3f > %s",
                           self.site, run_id, decision["attack"], step, decision["figure"], decision["value"],
                           decision["threshold"])
        else:
            logger.info("site %s leakage gate passed run %s step %d (best SSIM %s)", self.site, run_id, step,
                        decision["best_ssim"])
        return decision

    def _refuse_if_stopped(self, run_id: str) -> None:
        with self._lock:
            stopped = self._stopped.get(run_id)
        if stopped is not None:
            raise PolicyError(
                f"site policy: site {self.site} stopped releasing features of run {run_id!r}: its own "
                f"{stopped['attack']} attack on step {stopped['step']} reached {stopped['figure']} "
                f"{stopped['value']:.3f} > {stopped['threshold']}",
                detail=stopped)

    def describe(self) -> dict[str, Any] | None:
        """What ``GET /v1/info`` shows: the policy and, per run, the last decision and any stop."""
        if not self.active and not self._stopped:
            return None
        with self._lock:
            return {"every": self.policy.every, "checked": dict(self._checked), "stopped": dict(self._stopped)}

    def forget_run(self, run_id: str) -> None:
        with self._lock:
            self._pending.pop(run_id, None)
            self._checked.pop(run_id, None)
