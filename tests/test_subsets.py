"""The missing-site table: its 15 subsets, the checks against the targets (met and missed), the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitunet.subsets import SubsetsOptions, SubsetsResult, all_subsets, targets, write_report

SITES = ("t1", "t1ce", "t2", "flair")


def _rows(full_dropout: float, full_plain: float, single_drop: dict[str, float]) -> list[dict]:
    rows = []
    for subset in all_subsets(SITES):
        missing = [s for s in SITES if s not in subset]
        wt = full_dropout - (single_drop[missing[0]] if len(missing) == 1 else 0.2 * len(missing))
        dice = {"TC": 0.5, "WT": wt, "ET": 0.4, "mean": 0.5}
        plain = dict(dice, WT=full_plain if not missing else 0.1)
        rows.append({"sites": list(subset), "missing": missing, "dropout": dice, "no_dropout": plain})
    return rows


def test_every_non_empty_subset_once_full_set_first() -> None:
    subsets = all_subsets(SITES)
    assert len(subsets) == 15 == len(set(subsets))
    assert subsets[0] == SITES and [len(s) for s in subsets] == sorted((len(s) for s in subsets), reverse=True)


def test_targets_are_measured_and_can_be_missed() -> None:
    met = targets(_rows(0.90, 0.905, {"t1": 0.01, "t1ce": 0.02, "t2": 0.0, "flair": 0.04}), SITES)
    assert met["worst_single_missing"] == {"missing": "flair", "wt_drop": 0.04, "tolerance": 0.05, "met": True}
    assert met["full_set_wt_gap_to_no_dropout"]["met"] is True
    missed = targets(_rows(0.90, 0.93, {"t1": 0.01, "t1ce": 0.02, "t2": 0.0, "flair": 0.12}), SITES)
    assert missed["worst_single_missing"]["wt_drop"] == 0.12 and missed["worst_single_missing"]["met"] is False
    assert missed["full_set_wt_gap_to_no_dropout"] == {"gap": 0.03, "tolerance": 0.01, "met": False}


def test_report_files(tmp_path: Path) -> None:
    rows = _rows(0.9, 0.9, dict.fromkeys(SITES, 0.01))
    result = SubsetsResult(rows=rows, checks=targets(rows, SITES),
                           setup={"steps": 3, "dropout": 0.25, "val_cases": ["a"], "trained_in": "process"})
    json_path, html_path = write_report(result, tmp_path)
    assert json.loads(json_path.read_text())["rows"] == rows
    page = html_path.read_text()
    assert page.count("<tr>") == 16 and "t1ce, t2, flair" in page and "met" in page


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="val_cases"):
        SubsetsOptions(workdir=Path("x"), cases=3, val_cases=3)
    with pytest.raises(ValueError, match="dropout"):
        SubsetsOptions(workdir=Path("x"), dropout=0.0)
