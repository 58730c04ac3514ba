"""Bad configuration raises a clear error naming the parameter and the allowed values."""

from __future__ import annotations

import pytest

from splitunet.config import SiteSpec, SplitUNetConfig, parse_sites


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"cut_level": 5}, ["cut_level", "0..4"]),
        ({"cut_level": -1}, ["cut_level", "0..4"]),
        ({"cut_level": 2, "skips": (3,)}, ["skips", "allowed skip levels are [0, 1]"]),
        ({"cut_level": 0, "skips": (0,)}, ["skips", "allowed skip levels are []"]),
        ({"skips": "deep"}, ["skips", "'all', 'none'"]),
        ({"sites": ()}, ["sites", "at least one site"]),
        ({"fusion": "max"}, ["fusion", "concat", "sum", "mean"]),
        ({"spatial_dims": 4}, ["spatial_dims", "2 or 3"]),
        ({"features": (16,)}, ["features", "at least 2"]),
    ],
)
def test_bad_configuration_is_explained(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        SplitUNetConfig(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


def test_site_without_modality_is_explained():
    with pytest.raises(ValueError, match="at least one modality.*t1.*flair"):
        SiteSpec(name="a", modalities=())
    with pytest.raises(ValueError, match="unknown modality.*allowed modalities"):
        SiteSpec(name="a", modalities=("pet",))


def test_parse_sites_forms():
    assert [s.name for s in parse_sites("t1,t1ce,t2,flair")] == ["t1", "t1ce", "t2", "flair"]
    two = parse_sites("a=t1,t1ce b=t2,flair")
    assert [(s.name, s.modalities) for s in two] == [("a", ("t1", "t1ce")), ("b", ("t2", "flair"))]
    with pytest.raises(ValueError, match="at least one modality"):
        parse_sites("a=")


def test_sent_levels_follow_skip_policy():
    assert SplitUNetConfig(cut_level=3).sent_levels == (0, 1, 2, 3)
    assert SplitUNetConfig(cut_level=3, skips="none").sent_levels == (3,)
    assert SplitUNetConfig(cut_level=3, skips="2,1").sent_levels == (1, 2, 3)
    assert SplitUNetConfig(cut_level=3, skips=[1]).fused_channels(1) == 4 * 32
    assert SplitUNetConfig(fusion="sum").fused_channels(0) == 16


def test_roi_checked_against_depth():
    config = SplitUNetConfig(spatial_dims=2)
    assert config.check_roi((64, 96)) == (64, 96)
    with pytest.raises(ValueError, match="multiples of 16"):
        config.check_roi((64, 100))
    with pytest.raises(ValueError, match="2 sizes"):
        config.check_roi((64, 64, 64))
