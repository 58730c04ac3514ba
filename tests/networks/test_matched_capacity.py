"""Baselines of matched capacity: widths scaled so that the parameter count is the split model's within 5 %."""

from __future__ import annotations

import pytest

from splitunet.config import MODALITIES, SiteSpec, SplitUNetConfig
from splitunet.errors import ConfigurationError
from splitunet.networks.baselines import (
    centralized_config,
    matched_config,
    parameter_count,
    single_modality_config,
)
from splitunet.networks.split_unet import SplitUNet


def _split(dims: int, features: tuple[int, ...]) -> SplitUNetConfig:
    sites = tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES)
    return SplitUNetConfig(spatial_dims=dims, features=features, cut_level=0, sites=sites)


@pytest.mark.parametrize(("dims", "features"), [(2, (8, 16, 32, 64)), (2, (16, 32, 64, 128)), (3, (8, 16, 32, 64))])
def test_matched_baselines_have_the_split_models_parameter_count_within_5_percent(dims, features):
    split = _split(dims, features)
    target = parameter_count(split)
    assert target == sum(p.numel() for p in SplitUNet(split).parameters())
    for base in (centralized_config(split), single_modality_config(split, "flair")):
        matched = matched_config(base, target)
        assert abs(parameter_count(matched) - target) <= 0.05 * target
        assert matched.modalities == base.modalities and len(matched.features) == len(features)


def test_matching_a_much_larger_model_widens_every_level():
    split = _split(2, (8, 16, 32, 64))
    matched = matched_config(centralized_config(split), 4 * parameter_count(split))
    assert all(w > f for w, f in zip(matched.features, split.features))


def test_an_unreachable_target_is_refused():
    with pytest.raises(ConfigurationError, match="within"):
        matched_config(centralized_config(_split(2, (8, 16, 32, 64))), 10)
