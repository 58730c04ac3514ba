"""Baselines built from the same blocks as the Split-U-Net.

- :func:`centralized_config`: one "site" holding all modalities as input channels (the upper bound a hospital
  would reach with all images in one place). With one site and concat fusion, the decoder widths equal the split
  model's per-site widths, so the network is a plain U-Net of the same depth and widths.
- :func:`single_modality_config`: one site holding one modality (the lower bounds; FLAIR/T2 are usually best for
  WT, T1ce for ET/TC).

Both return a :class:`~splitunet.config.SplitUNetConfig`; build the model with ``SplitUNet(config)``.
:func:`matched_config` scales a baseline's encoder widths so that its parameter count matches another model's
(the Split-U-Net's) within a tolerance: the comparison at matched capacity, beside the one at equal widths.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitunet.config import MODALITIES, Fusion, SiteSpec, SkipPolicy, SplitUNetConfig
from splitunet.errors import ConfigurationError
from splitunet.networks.split_unet import SplitUNet


def centralized_config(config: SplitUNetConfig) -> SplitUNetConfig:
    """The centralized 4-channel model with the same widths as ``config`` (all modalities, one encoder)."""
    site = SiteSpec(name="central", modalities=MODALITIES)
    return _one_site(config, site)


def single_modality_config(config: SplitUNetConfig, modality: str) -> SplitUNetConfig:
    """A one-modality model with the same widths as ``config``."""
    if modality not in MODALITIES:
        raise ConfigurationError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
    site = SiteSpec(name=modality, modalities=(modality,))
    return _one_site(config, site)


def _one_site(config: SplitUNetConfig, site: SiteSpec) -> SplitUNetConfig:
    # re-validated (model_copy would skip validation)
    return SplitUNetConfig.model_validate(
        {**config.model_dump(), "sites": (site,), "fusion": Fusion.CONCAT, "cut_level": 0, "skips": SkipPolicy.ALL}
    )


def centralized_unet(config: SplitUNetConfig) -> SplitUNet:
    """Build the centralized baseline (input ``B, 4, *spatial`` in t1, t1ce, t2, flair order)."""
    return SplitUNet(centralized_config(config))


def single_modality_unet(config: SplitUNetConfig, modality: str) -> SplitUNet:
    """Build a single-modality baseline (input ``B, 1, *spatial``)."""
    return SplitUNet(single_modality_config(config, modality))


#: Matched capacity: the baseline's parameter count within this fraction of the model it is compared with.
MATCH_TOLERANCE = 0.05


def parameter_count(config: SplitUNetConfig) -> int:
    """Trainable parameters of the model ``config`` describes (every site's encoder and the decoder)."""
    import torch

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = SplitUNet(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _with_features(config: SplitUNetConfig, features: Sequence[int]) -> SplitUNetConfig:
    return SplitUNetConfig.model_validate({**config.model_dump(), "features": tuple(int(f) for f in features)})


def matched_config(config: SplitUNetConfig, parameters: int, *, tolerance: float = MATCH_TOLERANCE
                   ) -> SplitUNetConfig:
    """``config`` with every encoder width scaled by one factor ``k`` (``round(k * f)``, at least 1) so that its
    parameter count is the closest to ``parameters`` (within ``tolerance``, a fraction of ``parameters``).

    Raises:
        ConfigurationError: no factor reaches the tolerance (e.g. a target below the one-channel model).
    """
    if parameters < 1 or not 0 < tolerance < 1:
        raise ConfigurationError(f"need parameters >= 1 and 0 < tolerance < 1, got {parameters} and {tolerance}")
    base = tuple(config.features)

    def scaled(k: float) -> tuple[int, ...]:
        return tuple(max(1, round(k * f)) for f in base)

    lo, hi = 1.0 / 16, 16.0  # parameters grow with k (quadratically): bisect on k
    for _ in range(24):
        mid = (lo * hi) ** 0.5
        if parameter_count(_with_features(config, scaled(mid))) < parameters:
            lo = mid
        else:
            hi = mid
    # rounding makes the count a step function of k: take the closest of the candidates around the crossing
    candidates = {scaled(k) for k in (lo, hi)}
    for k in (lo, hi):
        widths = scaled(k)
        for i in range(len(widths)):  # one level a channel wider or narrower
            for d in (-1, 1):
                w = list(widths)
                w[i] = max(1, w[i] + d)
                candidates.add(tuple(w))
    best = min(candidates, key=lambda w: abs(parameter_count(_with_features(config, w)) - parameters))
    out = _with_features(config, best)
    count = parameter_count(out)
    if abs(count - parameters) > tolerance * parameters:
        raise ConfigurationError(
            f"no scaling of the widths {list(base)} gives {parameters} parameters within {tolerance:.0%} (closest: "
            f"{list(best)} with {count}); change the base widths or the tolerance")
    return out
