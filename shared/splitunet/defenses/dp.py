"""Differential privacy on what a party releases: per-patient L2 clipping to ``C``, then Gaussian noise.

``release = clip_C(F) + N(0, (z C)^2)`` per entry, where ``clip_C`` scales all of a patient's samples in the
batch (``FilterContext.groups``) jointly to L2 norm at most ``C``. The (epsilon, delta) spent is computed by an
Opacus accountant (:mod:`splitunet.defenses.accountant`, which states the assumptions). Three figures are
reported: ``epsilon`` (subsampled, add/remove: an honest aggregator's view, which the aggregator itself is not),
``epsilon_worst_patient`` (``q = 1``, add/remove) and ``epsilon_aggregator`` (``q = 1``, replace-one, the most
released patient, evaluation releases included): the figure against the aggregator. Each is per release, given
a fixed encoder. With an ``epsilon_budget`` the release that would exceed it (on ``budget_basis``) is refused
with :class:`~splitunet.errors.PolicyError` (403, rule ``epsilon_budget``) before anything is computed or
recorded.

On the gradient's way back the clip factor is applied to the gradient (the clip as a constant scale); the noise
is additive and passes straight through.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from splitunet.defenses.accountant import PrivacyLedger
from splitunet.defenses.base import NoiseSource, Stats, group_clip_factors, scale_samples
from splitunet.defenses.config import Adjacency, BudgetBasis, DPConfig
from splitunet.errors import PolicyError
from splitunet.filters import FilterContext

logger = logging.getLogger(__name__)


class DPGaussian:
    """The DP defense (see the module docstring).

    Args:
        config: clip ``C``, noise multiplier ``z``, delta, optional epsilon budget, accountant.
        ledger_path: JSON file keeping the privacy ledger across restarts (``None``: in memory).
        default_sample_rate: ``q`` used when the context gives none (the aggregator's own plan); 1 otherwise.
    """

    name = "dp"

    def __init__(
        self, config: DPConfig, *, ledger_path: Path | None = None, default_sample_rate: float | None = None
    ) -> None:
        self.config = config
        self.noise = NoiseSource(config.seed)
        self.ledger = PrivacyLedger(config.accountant, config.noise_multiplier, config.delta, ledger_path)
        self.default_sample_rate = default_sample_rate
        self._stats = Stats(calls=0.0, releases_train=0.0, patients_clipped=0.0, patients_seen=0.0)

    @property
    def noise_std(self) -> float:
        return self.config.noise_multiplier * self.config.clip

    def _sample_rate(self, context: FilterContext) -> float | None:
        if context.phase != "train":
            return None
        rate = context.sample_rate if context.sample_rate is not None else self.default_sample_rate
        return 1.0 if rate is None else min(1.0, max(float(rate), 1e-12))

    @staticmethod
    def _patients(context: FilterContext) -> list[str]:
        """The patients of a release; unknown patients are counted as one (the worst case: always the same)."""
        return ["<unknown>"] if context.groups is None else [str(g) for g in context.groups]

    def check_budget(self, q: float | None, patients: list[str]) -> None:
        """Raise :class:`PolicyError` if releasing ``patients`` now would exceed the epsilon budget."""
        budget = self.config.epsilon_budget
        if budget is None:
            return
        basis = self.config.budget_basis
        adjacency = Adjacency.REPLACE_ONE if basis == BudgetBasis.AGGREGATOR else Adjacency.ADD_REMOVE
        subsampled, worst = self.ledger.preview(q, patients, adjacency)
        would_be = subsampled if basis == BudgetBasis.SUBSAMPLED else worst
        if would_be > budget:
            raise PolicyError(
                f"this release would spend epsilon {would_be:.3f} ({self.config.budget_basis.value}), past the "
                f"budget of {budget:g} at delta {self.config.delta:g}; the site refuses further releases",
                detail={"rule": "epsilon_budget", "basis": self.config.budget_basis.value, "budget": budget,
                        "epsilon": round(self._current(), 6), "would_be": round(would_be, 6),
                        "delta": self.config.delta},
            )

    def _current(self) -> float:
        if self.config.budget_basis == BudgetBasis.SUBSAMPLED:
            return self.ledger.epsilon()
        if self.config.budget_basis == BudgetBasis.AGGREGATOR:
            return self.ledger.worst_patient_epsilon(Adjacency.REPLACE_ONE)
        return self.ledger.worst_patient_epsilon()

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        q = self._sample_rate(context)
        patients = self._patients(context)
        self.check_budget(q, patients)
        factors, clipped, seen = group_clip_factors(tensors, self.config.clip, context.groups)
        clipped_tensors = scale_samples(tensors, factors)
        out = {k: v + self.noise.gaussian(v, self.noise_std).to(v.dtype) for k, v in clipped_tensors.items()}
        self.ledger.record(q, patients)
        self._stats.add(calls=1, releases_train=1 if q is not None else 0, patients_clipped=clipped,
                        patients_seen=seen)
        if q is not None:
            self._stats.update(sample_rate=q)
        return out

    def backward(
        self, gradients: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor], context: FilterContext
    ) -> dict[str, torch.Tensor]:
        factors, _, _ = group_clip_factors(inputs, self.config.clip, context.groups)
        return scale_samples(gradients, factors)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "clip": self.config.clip, "noise_multiplier": self.config.noise_multiplier,
                "noise_std": self.noise_std, "delta": self.config.delta, "accountant": self.config.accountant.value,
                "epsilon_budget": self.config.epsilon_budget, "budget_basis": self.config.budget_basis.value}

    def stats(self) -> dict[str, object]:
        s = self._stats.snapshot()
        seen = s.get("patients_seen", 0.0)
        worst_profile, worst_epsilon = self.ledger.worst_profile(Adjacency.REPLACE_ONE)
        return {
            **s,
            "clip_rate": s.get("patients_clipped", 0.0) / seen if seen else 0.0,
            "noise_std": self.noise_std,
            "noise_multiplier": self.config.noise_multiplier,
            "epsilon": self.ledger.epsilon(),
            "epsilon_worst_patient": self.ledger.worst_patient_epsilon(),
            "epsilon_aggregator": worst_epsilon,
            "releases_most_released_patient": float(self.ledger.most_releases()),
            "worst_patient_releases": [[z, n] for z, n in worst_profile],  # [[noise multiplier, releases], ...]
            "delta": self.config.delta,
            "steps": float(self.ledger.steps),
        }
