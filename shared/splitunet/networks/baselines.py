"""Baselines built from the same blocks as the Split-U-Net.

- :func:`centralized_config`: one "site" holding all modalities as input channels (the upper bound a hospital
  would reach with all images in one place). With one site and concat fusion, the decoder widths equal the split
  model's per-site widths, so the network is a plain U-Net of the same depth and widths.
- :func:`single_modality_config`: one site holding one modality (the lower bounds; FLAIR/T2 are usually best for
  WT, T1ce for ET/TC).

Both return a :class:`~splitunet.config.SplitUNetConfig`; build the model with ``SplitUNet(config)``.
"""

from __future__ import annotations

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
