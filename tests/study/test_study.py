"""The study's configurations are valid jobs and site settings (checked before a 20-minute run, not during it),
rows are read from job status and audit results, and the choice follows the ΔSSIM-interval rule (issue 21: a
configuration qualifies when its strongest image attack's ΔSSIM 95 % interval is not above 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitunet.defenses.config import parse_site_defenses
from splitunet.demo import DemoOptions, study_plan, training_plan
from splitunet.federation import FederationSpec
from splitunet.study import (
    NONE,
    StudyConfig,
    StudyLevel,
    add_audit,
    find_epsilon,
    pick_best,
    row_from_runs,
    study_configs,
)


def test_full_study_covers_the_issue_and_every_configuration_is_a_valid_job(tmp_path):
    configs = study_configs("full")
    names = [c.name for c in configs]
    assert len(set(names)) == len(names)
    kinds = [d["name"] for c in configs for d in c.site_defenses]
    assert kinds.count("gaussian") >= 3 and kinds.count("dp") >= 2 and "nopeek" in kinds and "quantize" in kinds
    assert any(c.secure_sum for c in configs) and any(c.cut_level == 2 and c.skips == "none" for c in configs)
    options = DemoOptions(workdir=tmp_path)
    plan = study_plan(options, training_plan(options))
    for config in configs:
        if config.site_defenses:
            parse_site_defenses(json.loads(config.site_defenses_json))
        FederationSpec.model_validate({"sites": ["t1", "t1ce", "t2", "flair"], "val_cases": 1, **config.job(plan)})
    assert plan["steps"] % 10 == 0  # the last step is recorded and its encoder snapshot kept


def test_quick_study_reuses_the_main_plan_and_none_is_empty(tmp_path):
    options = DemoOptions(workdir=tmp_path, quick=True)
    assert options.study is StudyLevel.QUICK
    assert study_plan(options, training_plan(options)) == training_plan(options)
    assert study_configs("none") == [NONE]
    # 2D: the full study and the baselines by default; 3D: neither (they would not fit the 3D demos' budgets)
    assert DemoOptions(workdir=tmp_path).study is StudyLevel.FULL and DemoOptions(workdir=tmp_path).baselines
    three_d = DemoOptions(workdir=tmp_path, dims=3, quick=True)
    assert three_d.study is StudyLevel.NONE and three_d.baselines is False
    assert DemoOptions(workdir=tmp_path, dims=3, study="quick", baselines=True).baselines is True
    with pytest.raises(ValueError, match="study must be one of"):
        DemoOptions(workdir=tmp_path, study="huge")
    with pytest.raises(ValueError, match="file-name safe|lower-case"):
        StudyConfig("Bad Name")
    subset = DemoOptions(workdir=tmp_path, quick=True, study="full", study_only=("secure-sum", "dp-z0.5"))
    assert subset.study_only == ("secure-sum", "dp-z0.5")
    with pytest.raises(ValueError, match="study_only must name configurations of the quick study"):
        DemoOptions(workdir=tmp_path, quick=True, study_only=("dp-z0.5",))


def _row(name: str, wt: float, deltas: list[tuple[float, float]]):
    """A row whose two image findings have ΔSSIM intervals ``deltas`` (low, high); the mean is their middle."""
    row = row_from_runs(StudyConfig(name), {"validation": {"dice": {"TC": wt, "WT": wt, "ET": wt, "mean": wt}},
                                            "step": 10, "bytes_sent": 600, "bytes_received": 400,
                                            "defenses": {"sites": {"t1": [{"name": "dp", "epsilon": 3.5,
                                                                           "epsilon_aggregator": 40.0}]}}}, 5.0)
    findings = [{"site": "t1", "attack": a, "step": 10, "ssim": 0.3 + (lo + hi) / 2, "psnr": 20.0,
                 "rdlv": (lo + hi) / 2 / 0.3, "prior_ssim": 0.3, "delta_ssim": (lo + hi) / 2, "delta_ssim_low": lo,
                 "delta_ssim_high": hi, "n_samples": 8}
                for a, (lo, hi) in zip(("whitebox", "unsplit"), deltas, strict=True)]
    for site, dice in (("t1", 0.4), ("t2", 0.6)):
        findings.append({"site": site, "attack": "label_leakage", "step": 10, "dice": dice, "auc": 0.7,
                         "baseline_blob_dice": 0.2, "delta_dice": dice - 0.2, "delta_dice_low": dice - 0.3,
                         "delta_dice_high": dice - 0.1, "label_method": "norm/otsu", "label_steps": 3,
                         "n_samples": 24})
    add_audit(row, {"result": {"findings": findings, "dcor": {"t1": 0.9}}, "grids": {}, "report": "x.html"},
              {"t1": ["t1"]}, 1.0)
    return row


def test_rows_and_the_choice():
    # none: both attacks beat the prior; a: neither interval above 0 (one straddles it); b: qualifies, lower Dice;
    # c: the strongest (0.02, 0.3) beats the prior although the other does not
    rows = [_row("none", 0.9, [(0.4, 0.6), (0.1, 0.2)]), _row("a", 0.8, [(-0.05, 0.1), (-0.3, -0.1)]),
            _row("b", 0.7, [(-0.2, 0.0), (-0.5, -0.4)]), _row("c", 0.85, [(0.02, 0.3), (-0.9, -0.8)])]
    assert rows[0].bytes_per_step == 100 and rows[0].epsilon == 40.0  # the aggregator's figure, not the subsampled
    assert rows[0].as_json()["epsilon_subsampled"] == 3.5 and "aggregator" in rows[0].as_json()["epsilon_adversary"]
    # the strongest site's label attack is reported (t2: Dice 0.6), with its method and interval against the blob
    ll = rows[0].label_leakage
    assert ll["dice"] == 0.6 and ll["site"] == "t2" and ll["method"] == "norm/otsu" and ll["delta_dice_low"] > 0
    assert ll["mean_dice_over_sites"] == pytest.approx(0.5)
    assert rows[0].best_attack()["attack"] == "whitebox" and rows[0].best_attack()["delta_ssim_low"] == 0.4
    assert rows[3].best_attack()["attack"] == "whitebox"  # its lower bound (+0.02) is above 0: c does not qualify
    best = pick_best(rows)
    assert best["name"] == "a" and "[-0.050, +0.100]" in best["why"] and "cost" in best["why"], best
    assert "beats the public blob" in best["why"]
    none = pick_best([rows[0], rows[3]])
    assert none["name"] is None and "no configuration qualifies" in none["why"] and "[+0.020, +0.300]" in none["why"]
    # a protected model that does not segment is not a choice: named as protected but unusable
    unusable = pick_best([rows[0], _row("dead", 0.05, [(-0.2, -0.1), (-0.3, -0.2)])])
    assert unusable["name"] is None and "dead (WT 0.050)" in unusable["why"], unusable
    assert find_epsilon({"x": [{"epsilon": 1.0}, {"y": {"epsilon": 2.5}}]}) == 2.5 and find_epsilon({}) is None
    assert json.loads(json.dumps(rows[1].as_json()))["best_attack"]["delta_ssim_low"] == -0.05


def test_launcher_gives_each_site_an_audit_credential(tmp_path: Path):
    from splitunet.launcher import LocalFederation

    federation = LocalFederation(tmp_path)
    with pytest.raises(RuntimeError, match="start the sites first"):
        federation.start_audit()


def test_the_dp_rows_of_the_study_are_valid_and_calibrated_for_its_steps():
    from pydantic import TypeAdapter

    from splitunet.defenses import GradientDefenseConfig, parse_site_defenses
    from splitunet.demo import STUDY_STEPS
    from splitunet.study import ENCODER_DPSGD, LABEL_DP, STUDY_RELEASES, study_configs

    names = [c.name for c in study_configs("full")]
    assert LABEL_DP.name in names and ENCODER_DPSGD.name in names
    # label DP refuses a patient's release past `releases`: a study run must never reach it
    assert STUDY_RELEASES >= STUDY_STEPS
    (label,) = TypeAdapter(list[GradientDefenseConfig]).validate_python(list(LABEL_DP.gradient_defenses))
    assert label.epsilon <= 8 and label.sites == 4
    assert [d.name for d in parse_site_defenses(list(ENCODER_DPSGD.site_defenses))] == ["dpsgd", "dp"]
    assert ENCODER_DPSGD.cut_level >= 2 and ENCODER_DPSGD.skips == "none"
