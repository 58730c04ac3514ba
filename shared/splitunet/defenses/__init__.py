"""Defenses at the site/aggregator boundary, each a small class on the :mod:`splitunet.filters` contract.

| module | defense | where |
|---|---|---|
| :mod:`~splitunet.defenses.noise` | calibrated Gaussian / Laplace noise | site activations (also gradients) |
| :mod:`~splitunet.defenses.dp` | per-patient clip + Gaussian noise, Opacus accountant, epsilon budget | both |
| :mod:`~splitunet.defenses.label_dp` | label DP: clip + noise calibrated to a target epsilon | aggregator gradients |
| :mod:`~splitunet.defenses.dpsgd` | DP-SGD of the encoder, composed with ``dp`` in one accountant | site training |
| :mod:`~splitunet.defenses.quantize` | fp16 / int8 / int4 | site activations |
| :mod:`~splitunet.defenses.topk` | top-k sparsification (gradient only through kept entries) | site activations |
| :mod:`~splitunet.defenses.nopeek` | ``alpha * dCor(x, F)`` site loss term | site training |
| :mod:`~splitunet.defenses.gradient` | per-sample norm equalisation, spatial smoothing | aggregator gradients |

What each epsilon bounds, against whom: :mod:`splitunet.defenses.epsilon`. Secure-sum fusion is a protocol, not
a filter: :mod:`splitunet.secure_sum`. Configuration: :mod:`splitunet.defenses.config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splitunet.defenses.config import (
    DPConfig,
    DPSGDConfig,
    GaussianConfig,
    GradientDefenseConfig,
    LabelDPConfig,
    LaplaceConfig,
    NoPeekConfig,
    NormEqualizeConfig,
    QuantizeConfig,
    SiteDefenseConfig,
    SmoothConfig,
    TopKConfig,
    parse_site_defenses,
)
from splitunet.filters import FilterChain


@dataclass
class SiteDefenses:
    """A site's outbound filter chain, its loss terms (NoPeek) and its encoder's DP-SGD, from its configuration."""

    chain: FilterChain = field(default_factory=FilterChain)
    loss_terms: tuple = ()
    encoder_update: object | None = None  # EncoderDPSGD (splitunet.defenses.dpsgd)

    def _all(self) -> tuple:
        return (*self.chain.filters, *self.loss_terms, *(() if self.encoder_update is None else
                                                          (self.encoder_update,)))

    def describe(self) -> list[dict[str, object]]:
        return [d.describe() for d in self._all()]

    def stats(self) -> list[dict[str, object]]:
        return [{"name": d.name, **d.stats()} for d in self._all()]


def build_filter(config, *, ledger_path: Path | None = None, sample_rate: float | None = None):
    """The defense object of one configuration (a filter, or a loss term for NoPeek); ``ledger_path`` keeps a DP
    ledger across restarts (label DP: a folder, one ledger per site)."""
    from splitunet.defenses.dp import DPGaussian
    from splitunet.defenses.gradient import NormEqualize, Smooth
    from splitunet.defenses.label_dp import LabelDP
    from splitunet.defenses.noise import GaussianNoise, LaplaceNoise
    from splitunet.defenses.nopeek import NoPeek
    from splitunet.defenses.quantize import Quantize
    from splitunet.defenses.topk import TopK

    if isinstance(config, DPConfig):
        return DPGaussian(config, ledger_path=ledger_path, default_sample_rate=sample_rate)
    if isinstance(config, LabelDPConfig):
        return LabelDP(config, ledger_dir=ledger_path)
    table = {GaussianConfig: GaussianNoise, LaplaceConfig: LaplaceNoise, QuantizeConfig: Quantize, TopKConfig: TopK,
             NoPeekConfig: NoPeek, NormEqualizeConfig: NormEqualize, SmoothConfig: Smooth}
    return table[type(config)](config)


def build_site_defenses(configs: Sequence[SiteDefenseConfig], *, state_dir: Path | None = None) -> SiteDefenses:
    """Filters in the order given; NoPeek entries become loss terms, a DP-SGD entry the encoder's update (composed
    with the chain's DP). DP ledgers are kept under ``state_dir``."""
    from splitunet.defenses.dpsgd import EncoderDPSGD

    filters, terms, update = [], [], None
    for index, config in enumerate(configs):
        ledger = None if state_dir is None else Path(state_dir) / f"privacy-ledger-{index}-{config.name}.json"
        if isinstance(config, DPSGDConfig):
            update = EncoderDPSGD(config, ledger_path=ledger)
            continue
        defense = build_filter(config, ledger_path=ledger)
        (terms if isinstance(config, NoPeekConfig) else filters).append(defense)
    if update is not None:
        update.compose_with(filters)
    return SiteDefenses(FilterChain(filters), tuple(terms), update)


def build_gradient_chain(
    configs: Sequence[GradientDefenseConfig], *, sample_rate: float | None = None, state_dir: Path | None = None
) -> FilterChain:
    """The aggregator's outbound gradient chain; ``sample_rate`` is its plan's rate for the DP accountant. Label-DP
    ledgers are kept under ``state_dir`` (the job's), so a recovered job does not reset them."""
    return FilterChain([
        build_filter(c, sample_rate=sample_rate,
                     ledger_path=None if state_dir is None or not isinstance(c, LabelDPConfig)
                     else Path(state_dir) / f"label-dp-ledger-{i}")
        for i, c in enumerate(configs)])


__all__ = [
    "GradientDefenseConfig",
    "SiteDefenseConfig",
    "SiteDefenses",
    "build_filter",
    "build_gradient_chain",
    "build_site_defenses",
    "parse_site_defenses",
]
