"""Connected-component post-processing: the rules, the choice on validation cases, and the leave-one-out figures."""

from __future__ import annotations

import numpy as np
import pytest

from splitunet.postprocess import Rule, apply_rules, choose_rules, cross_validated

SPACING = (2.0, 2.0, 2.0)


def _case(rng: np.random.Generator, *, stray: bool) -> tuple[np.ndarray, np.ndarray]:
    """Truth: one tumour (TC = WT = ET, a cube); prediction: the truth, one voxel grown along x, plus (``stray``)
    a false-positive blob of 64 voxels, 24 or more voxels away (over 5 % of the predicted surface: a blob under 5 %
    would not move HD95 at all)."""
    truth = np.zeros((3, 48, 32, 24), dtype=np.uint8)
    x = int(rng.integers(4, 8))
    truth[:, x:x + 8, 10:18, 8:16] = 1
    pred = truth.astype(bool)
    pred[:, x + 8] |= truth[:, x + 7].astype(bool)
    if stray:
        pred[1, 40:44, 2:6, 2:6] = True  # 64 voxels of false-positive oedema
    return pred, truth


def test_rules_keep_the_largest_component_or_drop_small_ones():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:8, 2:8, 2:8] = True  # 216 voxels
    mask[15:17, 15:17, 15:17] = True  # 8 voxels
    mask[12, 2, 2] = True  # 1 voxel
    assert Rule("largest").apply(mask).sum() == 216
    assert Rule("min_size", 5).apply(mask).sum() == 216 + 8
    assert Rule().apply(mask).sum() == 225
    diagonal = np.zeros((5, 5, 5), dtype=bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True  # 26-connected: one component
    assert Rule("largest").apply(diagonal).sum() == 2
    with pytest.raises(ValueError, match="min_size"):
        Rule("min_size", 0)
    with pytest.raises(ValueError, match="kind"):
        Rule("median")


def test_a_rule_is_chosen_only_where_it_helps_and_the_figures_are_left_one_out():
    rng = np.random.default_rng(0)
    cases = [_case(rng, stray=True) for _ in range(3)]
    masks, truths = [c[0] for c in cases], [c[1] for c in cases]
    rules = choose_rules(masks, truths, [SPACING] * 3)
    assert rules["WT"].kind != "none"  # the strays far away set WT's HD95: removing them helps
    assert rules["TC"] == Rule() and rules["ET"] == Rule()  # nothing to remove there: left as predicted
    fixed = apply_rules(masks[0], rules)
    assert not fixed[1, 40:].any() and fixed[1].sum() == masks[0][1].sum() - 64
    result = cross_validated(["a", "b", "c"], masks, truths, [SPACING] * 3)
    raw, post = result["raw"], result["postprocessed"]
    assert raw["hd95"]["WT"] > 30 and post["hd95"]["WT"] <= 2.0 + 1e-6, (raw["hd95"], post["hd95"])
    assert post["dice"]["WT"] > raw["dice"]["WT"]
    assert post["hd95"]["TC"] == raw["hd95"]["TC"]
    assert set(result["rules_per_case"]) == {"a", "b", "c"}


def test_a_stray_on_one_case_only_is_not_learnt_for_the_others():
    # a case's own stray cannot teach the rule applied to it: the other cases have none, so leave-one-out keeps
    # that case raw; its figure is not improved by a rule chosen on itself
    rng = np.random.default_rng(1)
    cases = [_case(rng, stray=i == 0) for i in range(3)]
    result = cross_validated(["a", "b", "c"], [c[0] for c in cases], [c[1] for c in cases], [SPACING] * 3)
    assert result["rules_per_case"]["a"]["WT"] == "none"
    assert result["postprocessed"]["per_case"][0]["hd95"]["WT"] == result["raw"]["per_case"][0]["hd95"]["WT"]
    assert result["rules"]["WT"] != "none"  # on all three cases, the stray case makes removing strays pay


def test_cross_validated_needs_matching_inputs():
    with pytest.raises(ValueError, match="one mask"):
        cross_validated(["a"], [], [], [])
