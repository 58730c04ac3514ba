"""The demo's job plans, the real-BraTS preset and the phantom cache key (no service is started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitunet.demo import BRATS_PRESET, DemoOptions, generator_fingerprint, phantom_cache_key, training_plan
from splitunet.federation import FederationSpec

DOCS = Path(__file__).resolve().parents[1] / "docs"
SITES = ["t1", "t1ce", "t2", "flair"]  # registry names (AGG_SITES); a job carries no URL or credential


@pytest.mark.parametrize(("quick", "dims"), [(True, 2), (False, 2), (True, 3), (False, 3)])
def test_every_demo_plan_is_a_valid_job(tmp_path, quick, dims):
    plan = training_plan(DemoOptions(workdir=tmp_path, quick=quick, dims=dims))
    spec = FederationSpec.model_validate({"sites": SITES, **plan})
    assert spec.loss.value == "dice_ce"
    if dims == 3:
        assert spec.site_optimizer.schedule.value == "cosine"


def test_the_brats_preset_is_the_documented_job(tmp_path):
    data = tmp_path / "brats"
    data.mkdir()
    plan = training_plan(DemoOptions(workdir=tmp_path, data=data, dims=3, preset="brats"))
    spec = FederationSpec.model_validate({"sites": SITES, **plan})
    assert spec.roi == (128, 128, 128) and spec.sw_overlap == 0.5
    documented = json.loads((DOCS / "brats-job.json").read_text())
    FederationSpec.model_validate(documented)
    assert {k: documented[k] for k in BRATS_PRESET} == BRATS_PRESET
    with pytest.raises(ValueError, match="--data"):
        DemoOptions(workdir=tmp_path, dims=3, preset="brats")
    with pytest.raises(ValueError, match="3D"):
        DemoOptions(workdir=tmp_path, data=data, dims=2, preset="brats")


def test_the_phantom_cache_key_changes_with_the_generator(tmp_path):
    source = tmp_path / "phantom.py"
    source.write_text("SCALE = 1.0\n")
    before = generator_fingerprint([source])
    source.write_text("SCALE = 1.1\n")
    after = generator_fingerprint([source])
    assert before != after
    options = DemoOptions(workdir=tmp_path, quick=True)
    assert phantom_cache_key(options, before) != phantom_cache_key(options, after)
    assert phantom_cache_key(options) == phantom_cache_key(options)  # stable for the installed generator
    assert len(generator_fingerprint()) == 64
