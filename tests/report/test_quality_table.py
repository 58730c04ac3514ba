"""The report's quality part: the checks judged against the matched-capacity baseline, and the table with parameter
counts and raw beside post-processed figures."""

from __future__ import annotations

from splitunet.report.quality import quality_table
from splitunet.report.summary import paper_checks

REG = ("TC", "WT", "ET")


def _dice(wt: float) -> dict:
    d = {"TC": wt - 0.05, "WT": wt, "ET": wt - 0.1}
    return d | {"mean": sum(d.values()) / 3}


def _agg(wt: float, hd: float) -> dict:
    return {"dice": _dice(wt), "hd95": {r: hd for r in (*REG, "mean")}, "hd95_median": {r: hd for r in (*REG, "mean")}}


def _report() -> dict:
    singles = ("t1", "flair")
    return {
        "dice": {"split": _dice(0.95), "centralized": _dice(0.80), "centralized_matched": _dice(0.94),
                 "single_modality": {m: _dice(0.7) for m in singles}},
        "hd95_mm": {"split": {r: 50.0 for r in REG}, "centralized": {r: 60.0 for r in REG},
                    "centralized_matched": {r: 55.0 for r in REG},
                    "single_modality": {m: {r: 70.0 for r in REG} for m in singles}},
        "hd95_median": {"split": {r: 48.0 for r in REG}},
        "parameters": {"split": 129_771, "centralized": 122_715, "centralized_matched": 130_116,
                       "single_modality": {m: 129_873 for m in singles}},
        "features": {"centralized_matched": [9, 16, 33, 66]},
        "postprocessed": {"split": {"raw": _agg(0.95, 50.0), "postprocessed": _agg(0.96, 4.5),
                                    "rules": {"WT": "largest component", "TC": "none", "ET": "none"},
                                    "method": "leave one out"},
                          "centralized_matched": {"raw": _agg(0.94, 55.0), "postprocessed": _agg(0.95, 6.0),
                                                  "rules": {"WT": "largest component", "TC": "none", "ET": "none"}}},
        "study": [],
    }


def test_the_checks_compare_with_the_matched_capacity_baseline():
    checks = {c["claim"]: c for c in paper_checks(_report())}
    within = checks["Split-U-Net within 0.03 WT Dice of centralized"]
    # against the equal-width model (0.80) the upper-bound claim would fail; against the matched one (0.94) it holds
    assert within["holds"] is True and "matched-capacity centralized 0.940" in within["measured"]
    assert "129,771 vs 130,116 parameters" in within["measured"]
    upper = checks["centralized U-Net (the upper bound) at least as good as Split-U-Net on WT Dice"]
    assert upper["holds"] is True


def test_the_table_shows_parameters_and_raw_beside_post_processed_figures():
    table = quality_table(_report())
    assert "<th>parameters</th>" in table and "post-processed HD95 WT (mm)" in table
    assert "129,771" in table and "130,116" in table and "widths 9-16-33-66" in table
    split_row = next(r for r in table.split("<tr>") if r.startswith("<td>Split-U-Net"))
    assert "<td>50.0 (48.0)</td>" in split_row and "<td>4.5 (4.5)</td>" in split_row
    assert "WT: largest component" in table
    # a single-modality model without post-processed figures shows a dash, not a made-up number
    t1_row = next(r for r in table.split("<tr>") if r.startswith("<td>single modality: t1"))
    assert t1_row.count("–") == 6


def test_the_page_gives_mean_sd_and_per_seed_values_with_seeds():
    from splitunet.seeds import SeedRun, spread

    figures = [{"dice": _dice(wt), "hd95": {r: hd for r in (*REG, "mean")}} for wt, hd in ((0.9, 40.0), (0.94, 20.0))]
    report = _report() | {"seeds": spread([SeedRun(seed=s, val_ids=["a"], figures={"split": f})
                                           for s, f in enumerate(figures)])}
    table = quality_table(report)
    assert "Over 2 seeds" in table and "0.920 ± 0.028" in table and "0.900, 0.940" in table
    assert "30.0 ± 14.1" in table and "40.0, 20.0" in table
    assert "Over" not in quality_table(_report())  # one run: no seed table
