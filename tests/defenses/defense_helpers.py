"""Helpers shared by the defense tests."""

from __future__ import annotations

from typing import Any

from splitunet.config import MODALITIES, SiteSpec, SplitUNetConfig


def tiny_config(spatial_dims: int = 2, features: tuple[int, ...] = (4, 8, 16), **kwargs: Any) -> SplitUNetConfig:
    """A tiny Split-U-Net over four one-modality sites."""
    sites = tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES)
    return SplitUNetConfig(spatial_dims=spatial_dims, features=features, sites=sites, **kwargs)
