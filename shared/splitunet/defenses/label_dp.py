"""Label DP at the aggregator: the gradients it returns are a Gaussian mechanism on the labels, at a target epsilon.

The aggregator holds the segmentations; a site learns about them only through the gradients it gets back
(the label attack, :mod:`splitunet.attacks.label_leakage`). This filter runs on those gradients::

    release_k = clip_C(dL/dF_k) + N(0, (z C)^2)      per entry, per site k, per training step

where ``clip_C`` scales all of a patient's samples of the batch jointly (``FilterContext.groups``) to L2 norm at
most ``C``, and ``z`` is calibrated from the target ``epsilon`` with Opacus (``get_noise_multiplier``) for
``releases`` releases of one patient to each of ``sites`` sites (``sites = 1``: against one site; the site count:
against every site pooling its gradients), **without subsampling** (``q = 1``: a site is told which patients each
batch holds) and under **replace-one** adjacency (one patient's segmentation swapped for any other: sensitivity
``2C``, so Opacus calibrates ``z / 2``). Evaluation sends no gradients and spends nothing.

What the epsilon bounds: what sites learn about one patient's segmentation from the gradients they receive,
per release, given the decoder and the features of that step (the loss is per sample, so a patient's gradient
depends on its own label only). ``epsilon_site`` is the figure against one site; ``epsilon_sites_colluding``
composes every site's releases of the patient in one accountant (sites that pool their gradients). It does
**not** bound what the decoder (trained on the raw labels) or the final model reveal.

A release that would take a patient past ``releases`` to one site (so past the target epsilon) is refused with
:class:`~splitunet.errors.PolicyError` (403, rule ``label_epsilon_budget``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from splitunet.defenses.accountant import PrivacyLedger, per_patient_epsilon, sensitivity_factor
from splitunet.defenses.base import NoiseSource, Stats, group_clip_factors, scale_samples
from splitunet.defenses.config import Adjacency, LabelDPConfig
from splitunet.errors import PolicyError
from splitunet.filters import FilterContext

logger = logging.getLogger(__name__)


def calibrate_noise_multiplier(config: LabelDPConfig) -> float:
    """The noise multiplier ``z`` (noise std ``z * C``) whose ``config.releases`` unsubsampled releases of one
    patient to each of ``config.sites`` sites spend at most ``config.epsilon`` at ``config.delta`` under
    replace-one adjacency (Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    add_remove = get_noise_multiplier(target_epsilon=config.epsilon, target_delta=config.delta, sample_rate=1.0,
                                      steps=config.releases * config.sites, accountant=config.accountant.value,
                                      epsilon_tolerance=0.01)
    return float(add_remove) * sensitivity_factor(Adjacency.REPLACE_ONE)


class LabelDP:
    """Label DP on the aggregator's outbound gradients (see the module docstring).

    Args:
        config: target epsilon and delta, clip ``C``, the releases per patient the noise is calibrated for.
        ledger_dir: folder keeping one JSON ledger per site across restarts (``None``: in memory).
    """

    name = "label_dp"

    def __init__(self, config: LabelDPConfig, *, ledger_dir: Path | None = None) -> None:
        self.config = config
        self.ledger_dir = ledger_dir
        self.noise = NoiseSource(config.seed)
        self.noise_multiplier = calibrate_noise_multiplier(config)
        self._ledgers: dict[str, PrivacyLedger] = {}
        self._lock = threading.Lock()
        self._stats = Stats(calls=0.0, patients_clipped=0.0, patients_seen=0.0)
        logger.info("label DP: target epsilon %g at delta %g over %d releases per patient: noise multiplier %.3f",
                    config.epsilon, config.delta, config.releases, self.noise_multiplier)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.config.clip

    def _ledger(self, site: str) -> PrivacyLedger:
        with self._lock:
            if site not in self._ledgers:
                path = None if self.ledger_dir is None else Path(self.ledger_dir) / f"{site}.json"
                self._ledgers[site] = PrivacyLedger(self.config.accountant, self.noise_multiplier, self.config.delta,
                                                    path)
            return self._ledgers[site]

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        """Clip per patient and add noise to ``tensors`` (``{name: B, C, *spatial}`` gradients for one site)."""
        if context.phase != "train":
            return dict(tensors)
        patients = ["<unknown>"] if context.groups is None else sorted({str(g) for g in context.groups})
        ledger = self._ledger(context.site)
        counts = ledger.counts()
        most = max((counts[p] + 1 for p in patients), default=1)
        if most > self.config.releases:
            raise PolicyError(
                f"label DP: this gradient release would be release {most} of a patient to site {context.site!r}, "
                f"past the {self.config.releases} the noise was calibrated for (epsilon {self.config.epsilon:g} at "
                f"delta {self.config.delta:g}); raise `releases` (more noise) or train fewer steps",
                detail={"rule": "label_epsilon_budget", "releases": self.config.releases, "would_be": most},
            )
        factors, clipped, seen = group_clip_factors(tensors, self.config.clip, context.groups)
        out = {k: v + self.noise.gaussian(v, self.noise_std).to(v.dtype)
               for k, v in scale_samples(tensors, factors).items()}
        ledger.record(1.0, patients)
        self._stats.add(calls=1, patients_clipped=clipped, patients_seen=seen)
        return out

    def epsilons(self) -> tuple[float, float, int]:
        """``(against one site, against all sites pooled, releases of the most released patient to one site)``,
        replace-one adjacency, ``q = 1``."""
        with self._lock:
            ledgers = list(self._ledgers.values())
        one = max((ledger.most_releases() for ledger in ledgers), default=0)
        pooled: dict[str, int] = {}
        for ledger in ledgers:
            for patient, n in ledger.counts().items():
                pooled[patient] = pooled.get(patient, 0) + n
        kind, delta = self.config.accountant, self.config.delta
        single = per_patient_epsilon(kind, [(self.noise_multiplier, one)], delta, Adjacency.REPLACE_ONE)
        colluding = per_patient_epsilon(kind, [(self.noise_multiplier, max(pooled.values(), default=0))], delta,
                                        Adjacency.REPLACE_ONE)
        return single, colluding, one

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "epsilon": self.config.epsilon, "delta": self.config.delta,
                "clip": self.config.clip, "releases": self.config.releases, "sites": self.config.sites,
                "noise_multiplier": self.noise_multiplier, "noise_std": self.noise_std,
                "adjacency": Adjacency.REPLACE_ONE.value, "accountant": self.config.accountant.value}

    def stats(self) -> dict[str, float]:
        s = self._stats.snapshot()
        seen = s.get("patients_seen", 0.0)
        single, colluding, most = self.epsilons()
        return {**s, "clip_rate": s.get("patients_clipped", 0.0) / seen if seen else 0.0,
                "noise_multiplier": self.noise_multiplier, "noise_std": self.noise_std,
                "epsilon_target": self.config.epsilon, "epsilon_site": single,
                "epsilon_sites_colluding": colluding, "releases_most_released_patient": float(most),
                "delta": self.config.delta}
