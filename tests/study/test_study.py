"""The study's configurations are valid jobs and site settings (checked before a 20-minute run, not during it),
rows are read from job status and audit results, and the choice follows the RDLV rule."""

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


def _row(name: str, wt: float, rdlvs: list[float]):
    row = row_from_runs(StudyConfig(name), {"validation": {"dice": {"TC": wt, "WT": wt, "ET": wt, "mean": wt}},
                                            "step": 10, "bytes_sent": 600, "bytes_received": 400,
                                            "defenses": {"sites": {"t1": [{"name": "dp", "epsilon": 3.5,
                                                                           "epsilon_aggregator": 40.0}]}}}, 5.0)
    findings = [{"site": "t1", "attack": a, "step": 10, "ssim": 0.5 + r / 4, "psnr": 20.0, "rdlv": r,
                 "prior_ssim": 0.5} for a, r in zip(("whitebox", "unsplit"), rdlvs, strict=True)]
    findings.append({"site": "t1", "attack": "label_leakage", "step": 10, "dice": 0.4, "auc": 0.7})
    add_audit(row, {"result": {"findings": findings, "dcor": {"t1": 0.9}}, "grids": {}, "report": "x.html"},
              {"t1": ["t1"]}, 1.0)
    return row


def test_rows_and_the_choice():
    rows = [_row("none", 0.9, [0.6, 0.2]), _row("a", 0.8, [-0.1, -0.3]), _row("b", 0.7, [0.0, -0.5]),
            _row("c", 0.85, [0.1, -0.9])]
    assert rows[0].bytes_per_step == 100 and rows[0].epsilon == 40.0  # the aggregator's figure, not the subsampled
    assert rows[0].as_json()["epsilon_subsampled"] == 3.5 and "aggregator" in rows[0].as_json()["epsilon_adversary"]
    assert rows[0].label_leakage == {"dice": 0.4, "auc": 0.7}
    assert rows[0].best_attack()["attack"] == "whitebox" and rows[0].best_attack()["rdlv"] == 0.6
    best = pick_best(rows)
    assert best["name"] == "a" and "-0.100" in best["why"] and "-0.100" in best["why"] and "cost" in best["why"]
    none = pick_best([rows[0], rows[3]])
    assert none["name"] is None and "no configuration qualifies" in none["why"]
    assert find_epsilon({"x": [{"epsilon": 1.0}, {"y": {"epsilon": 2.5}}]}) == 2.5 and find_epsilon({}) is None
    assert json.loads(json.dumps(rows[1].as_json()))["best_attack"]["rdlv"] == -0.1


def test_launcher_gives_each_site_an_audit_credential(tmp_path: Path):
    from splitunet.launcher import LocalFederation

    federation = LocalFederation(tmp_path)
    with pytest.raises(RuntimeError, match="start the sites first"):
        federation.start_audit()
