"""DP-SGD of a site's encoder (Opacus), composed with the DP on what the site sends in one accountant.

Without it, every epsilon of :mod:`splitunet.defenses.dp` is **per release, given a fixed encoder**: the encoder
itself is trained on the raw images, and what it learnt is in every release. With it, the encoder's update of
each training step is a Gaussian mechanism too::

    g_p   = sum of patient p's per-sample gradients of the encoder's parameters (Opacus GradSampleModule)
    update = (sum_p clip_C(g_p) + N(0, (z C)^2)) / B              (Opacus DPOptimizer, per patient, not per sample)

so the encoder at step ``t`` is a post-processing of earlier noised updates, and the site's releases (activation
DP, the ``dp`` entry its configuration must hold) and its updates compose. The site's **aggregator epsilon** is
one Opacus accountant over, for the most exposed patient, its activation releases (training and evaluation) and
its encoder updates, each with ``q = 1`` (the aggregator plans the batches) and replace-one adjacency
(sensitivity ``2C``, the noise multiplier halved), :func:`~splitunet.defenses.accountant.per_patient_epsilon`.
A per-sample gradient the aggregator chooses does not escape the bound: it is clipped like any other.

The runtime builds one :class:`PatientDPOptimizer` per run (:meth:`EncoderDPSGD.attach`); the site step calls
:meth:`PatientDPOptimizer.begin` before each training forward and :meth:`PatientDPOptimizer.step_for` with the
batch's patients instead of ``step()`` (:class:`~splitunet.protocol.PatientOptimizer`). Needs the synchronous
step schedule (the delayed one runs the forward on parameter copies, which Opacus's hooks do not see).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from splitunet.defenses.accountant import PrivacyLedger
from splitunet.defenses.base import Stats
from splitunet.defenses.config import Adjacency, DPSGDConfig

if TYPE_CHECKING:
    from splitunet.defenses.dp import DPGaussian

logger = logging.getLogger(__name__)


def make_patient_dp_optimizer(optimizer: torch.optim.Optimizer, encoder: torch.nn.Module, config: DPSGDConfig,
                              ledger: PrivacyLedger):
    """A :class:`PatientDPOptimizer` over ``optimizer`` with Opacus's per-sample hooks on ``encoder`` (Opacus is
    imported here, lazily: it takes seconds to import)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    class PatientDPOptimizer(DPOptimizer):
        """Opacus's DPOptimizer with per-patient clipping and a privacy ledger (see the module docstring)."""

        def __init__(self) -> None:
            device = next(encoder.parameters()).device
            generator = None
            if config.seed is not None:
                generator = torch.Generator(device=device).manual_seed(config.seed)
            super().__init__(optimizer, noise_multiplier=config.noise_multiplier, max_grad_norm=config.clip,
                             expected_batch_size=1, loss_reduction="mean", generator=generator)
            for module in encoder.modules():  # Opacus's backward hooks forbid in-place ops on hooked outputs
                if getattr(module, "inplace", False):
                    module.inplace = False
            # hooks on the encoder's layers: per-sample gradients of the mean loss, rescaled to one sample's
            self.grad_sample_module = GradSampleModule(encoder, loss_reduction="mean")
            self.ledger = ledger

        def begin(self) -> None:
            """Forget what a forward left without its backward (a replaced step), before a training forward."""
            for module in self.grad_sample_module.modules():
                if hasattr(module, "activations"):
                    module.activations = []
            for p in self.params:
                p._forward_counter = 0
                p.grad_sample = None
                if hasattr(p, "_current_grad_sample"):  # accumulated by a backward whose forward was not promoted
                    del p._current_grad_sample

        def step_for(self, groups: Sequence[str] | None) -> None:
            """Sum each patient's per-sample gradients (``groups``: the patient of each sample; ``None``: each
            sample its own), clip each patient's to ``C``, add the noise, step, record the patients' update."""
            rows = self._get_flat_grad_sample(self.params[0]).shape[0]
            groups = [str(i) for i in range(rows)] if groups is None else [str(g) for g in groups]
            if len(groups) != rows:
                raise ValueError(f"DP-SGD: {len(groups)} patients named for a batch of {rows} samples")
            index: dict[str, int] = {}
            ids = torch.tensor([index.setdefault(g, len(index)) for g in groups])
            for p in self.params:
                flat = self._get_flat_grad_sample(p)
                p.grad_sample = torch.zeros((len(index), *flat.shape[1:]), dtype=flat.dtype,
                                            device=flat.device).index_add_(0, ids.to(flat.device), flat)
            self.expected_batch_size = rows  # the loss is a mean over the batch's samples
            self.step()
            self.ledger.record(1.0, index)

    return PatientDPOptimizer()


class EncoderDPSGD:
    """A site's DP-SGD: configuration, the ledger of encoder updates per patient, and the composed epsilon.

    Args:
        config: clip, noise multiplier, delta, accountant.
        ledger_path: JSON file keeping the update counts across restarts (``None``: in memory).
    """

    name = "dpsgd"

    def __init__(self, config: DPSGDConfig, *, ledger_path: Path | None = None) -> None:
        self.config = config
        self.ledger = PrivacyLedger(config.accountant, config.noise_multiplier, config.delta, ledger_path)
        self.releases: tuple[DPGaussian, ...] = ()
        self._stats = Stats(runs_attached=0.0)  # runs built with DP-SGD (restored ones too)

    def compose_with(self, filters: Sequence[object]) -> None:
        """Compose with the activation DP among ``filters`` (the site's chain)."""
        from splitunet.defenses.dp import DPGaussian

        self.releases = tuple(f for f in filters if isinstance(f, DPGaussian))

    def attach(self, encoder: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """The run's optimizer: ``optimizer`` wrapped for per-patient DP-SGD on ``encoder``."""
        self._stats.add(runs_attached=1)
        return make_patient_dp_optimizer(optimizer, encoder, self.config, self.ledger)

    def worst_profile(self) -> tuple[tuple[tuple[float, int], ...], float]:
        """The releases and updates ``((z, n), ...)`` of the patient with the largest epsilon (``q = 1``,
        replace-one; activation releases of every composed DP filter, then encoder updates), and that epsilon."""
        ledgers = [*(f.ledger for f in self.releases), self.ledger]
        profiles = [ledger.profiles() for ledger in ledgers]
        patients = set().union(*profiles)
        combined = {tuple(m for prof in profiles for m in prof.get(p, ())) for p in patients}
        if not combined:
            return (), 0.0
        return max(((c, self.ledger.profile_epsilon(c, Adjacency.REPLACE_ONE)) for c in combined),
                   key=lambda item: item[1])

    def epsilon_aggregator(self) -> float:
        """The largest epsilon of any patient over its releases and encoder updates (``q = 1``, replace-one)."""
        return self.worst_profile()[1]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "clip": self.config.clip, "noise_multiplier": self.config.noise_multiplier,
                "delta": self.config.delta, "accountant": self.config.accountant.value,
                "composed_with": [f.name for f in self.releases], "adjacency": Adjacency.REPLACE_ONE.value}

    def stats(self) -> dict[str, object]:
        profile, epsilon = self.worst_profile()
        return {**self._stats.snapshot(), "steps": float(self.ledger.steps),
                "noise_multiplier": self.config.noise_multiplier, "clip": self.config.clip,
                "updates_most_updated_patient": float(self.ledger.most_releases()),
                "epsilon_encoder_aggregator": self.ledger.worst_patient_epsilon(Adjacency.REPLACE_ONE),
                "epsilon_aggregator": epsilon, "worst_patient_releases": [[z, n] for z, n in profile],
                "delta": self.config.delta}
