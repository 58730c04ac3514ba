"""A site's protection of what it releases: its defenses (filters and NoPeek), secure-sum masking per run, and
their reports (``GET /v1/info``, backward acks, ``/metrics``).

The site runtime calls this object at four points: building a run's step (filters, loss terms), each forward
(patients and sampling rate for the filters, then secure-sum masking), each backward ack (stats), and the two
secure-sum key-exchange calls. The aggregator cannot switch any of it off: it is configured by the site alone.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from services.client_site.settings import SiteSettings
from splitunet.defenses import SiteDefenses, build_site_defenses
from splitunet.errors import ConfigurationError, NotFoundError, PolicyError
from splitunet.filters import FilterChain
from splitunet.schemas import ForwardRequest, Phase, RunSetup
from splitunet.secure_sum import (
    PeerPolicy,
    SecureSumAck,
    SecureSumOffer,
    SecureSumPeers,
    SiteMasker,
    request_nonce,
)
from splitunet.service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


class SiteProtection:
    """Defenses and secure sum of one site.

    Args:
        settings: the site's settings (``defenses``, ``require_secure_sum``, ``state_dir`` for DP ledgers).
        metrics: the service's metrics; each defense statistic becomes ``splitunet_site_defense{defense, stat}``.
        filters: an explicit filter chain (tests) instead of the one built from ``settings.defenses``.
    """

    def __init__(
        self, settings: SiteSettings, metrics: ServiceMetrics | None = None, filters: FilterChain | None = None
    ) -> None:
        self.settings = settings
        self.defenses = (
            SiteDefenses(chain=filters) if filters is not None
            else build_site_defenses(settings.defenses, state_dir=settings.state_dir)
        )
        self._maskers: dict[str, SiteMasker] = {}
        self.identity = settings.identity()
        self._lock = threading.Lock()
        self._gauge = None
        if metrics is not None:
            self._gauge = metrics.gauge(
                "site_defense", "What each defense of this site did so far", ["defense", "stat"]
            )
        if self.defenses.describe():
            logger.info("site %s defenses: %s", settings.site_id, [d["name"] for d in self.defenses.describe()])

    @property
    def chain(self) -> FilterChain:
        return self.defenses.chain

    @property
    def loss_terms(self) -> tuple:
        return self.defenses.loss_terms

    @property
    def encoder_update(self):
        """The encoder's DP-SGD (:class:`~splitunet.defenses.dpsgd.EncoderDPSGD`), or None."""
        return self.defenses.encoder_update

    def describe(self) -> list[dict[str, Any]]:
        described = self.defenses.describe()
        if self.settings.require_secure_sum:
            described.append({"name": "secure_sum", "required": True})
        return described

    def stats(self) -> list[dict[str, Any]]:
        """Every defense's statistics, also published to ``/metrics``."""
        report = self.defenses.stats()
        with self._lock:
            maskers = [m for m in self._maskers.values() if m.established]
        if maskers:
            masked = sum(m.stats()["masked_entries"] for m in maskers)
            clipped = sum(m.stats()["clip_rate"] * m.stats()["masked_entries"] for m in maskers)
            report.append({"name": "secure_sum", "runs": float(len(maskers)), "masked_entries": masked,
                           "clip_rate": clipped / masked if masked else 0.0})
        if self._gauge is not None:
            for entry in report:
                for key, value in entry.items():
                    if key != "name" and isinstance(value, int | float):
                        self._gauge.labels(defense=str(entry["name"]), stat=key).set(float(value))
        return report

    # ------------------------------------------------------------------ forward
    @staticmethod
    def patients(request: ForwardRequest) -> list[str]:
        """The patient of every sample (DP clips per patient)."""
        return [s.case_id for s in request.samples]

    @staticmethod
    def sample_rate(setup: RunSetup, request: ForwardRequest, cohort: int) -> float | None:
        """The rate at which the aggregator's declared plan draws a patient into a training batch; 1 when the run
        declared no plan (no amplification assumed); None for evaluation."""
        if request.phase != Phase.TRAIN:
            return None
        if setup.sampling is None:
            return 1.0
        return setup.sampling.sample_rate(len(request.samples), cohort)

    def outbound(
        self, run_id: str, request: ForwardRequest, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Secure-sum masking of a forward's (filtered) tensors, if the run set it up; refuses unmasked forwards
        when this site requires secure sum."""
        masker = self._maskers.get(run_id)
        if masker is None or not masker.established:
            if self.settings.require_secure_sum:
                raise PolicyError(
                    f"site {self.settings.site_id} releases features only under secure-sum fusion; set up secure "
                    "sum for this run (a job with fusion=sum and secure_sum)",
                    detail={"rule": "secure_sum_required"},
                )
            if self._agreed(run_id).exists():  # keys lost in a restart: never fall back to plain features
                raise PolicyError(
                    f"run {run_id!r} agreed on secure sum with site {self.settings.site_id}, whose keys were lost "
                    "in a restart; agree the keys again (GET then POST /v1/runs/{run}/secure-sum) before forwards",
                    detail={"rule": "secure_sum_required"},
                )
            return tensors
        return masker.mask(tensors, request_nonce(run_id, request.model_dump_json()))

    # ------------------------------------------------------------------ secure sum key exchange
    def secure_sum_offer(self, run_id: str, setup: RunSetup) -> SecureSumOffer:
        if setup.model.fusion.value != "sum":
            raise ConfigurationError(
                f"secure sum needs fusion=sum; run {run_id!r} fuses by {setup.model.fusion.value}",
                detail={"fusion": setup.model.fusion.value},
            )
        with self._lock:
            masker = self._maskers.get(run_id)
            if masker is None:
                masker = self._maskers[run_id] = SiteMasker(self.settings.site_id, run_id, self.identity)
        return masker.offer()

    def secure_sum_establish(self, run_id: str, peers: SecureSumPeers, setup: RunSetup) -> SecureSumAck:
        """Agree the pairwise keys of a run, after checking the relayed set: exactly the run's sites, at least the
        policy's minimum, every peer's offer signed by its pinned identity key (:class:`PeerPolicy`)."""
        masker = self._maskers.get(run_id)
        if masker is None:
            raise NotFoundError(f"no secure-sum key for run {run_id!r}; GET /v1/runs/{run_id}/secure-sum first")
        if self.settings.site_id not in peers.order:
            raise ConfigurationError(f"the relayed key set has no site {self.settings.site_id!r} (this site)")
        policy = PeerPolicy(self.settings.pinned_peers(), [s.name for s in setup.model.sites],
                            self.settings.policy.min_secure_sum_sites)
        ack = masker.establish(peers, policy)
        marker = self._agreed(run_id)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return ack

    def _agreed(self, run_id: str) -> Path:
        """A marker in the state folder: the run agreed on secure sum (it survives a restart; the keys do not)."""
        return Path(self.settings.state_dir) / "secure-sum" / run_id

    def drop_run(self, run_id: str) -> None:
        with self._lock:
            self._maskers.pop(run_id, None)
