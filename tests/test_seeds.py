"""The headline comparison over seeds: held-out draws, mean ± sd, claims judged beyond one sd, the extra runs."""

from __future__ import annotations

import pytest

from splitunet.seeds import SeedRun, held_out, merge_checks, more_seeds, seed_checks, spread

REGIONS = ("TC", "WT", "ET")


def _fig(wt: float, hd: float = 5.0) -> dict:
    dice = {"TC": 0.9, "WT": wt, "ET": 0.8, "mean": (1.7 + wt) / 3}
    return {"dice": dice, "hd95": {r: hd for r in (*REGIONS, "mean")}}


def _runs(split: list[float], central: list[float]) -> list[SeedRun]:
    return [SeedRun(seed=i, val_ids=["a"], figures={"split": _fig(s), "centralized_matched": _fig(c),
                                                    "centralized": _fig(c - 0.1)})
            for i, (s, c) in enumerate(zip(split, central, strict=True))]


def test_held_out_cases_vary_with_the_seed_and_leave_training_cases():
    ids = [f"c{i:02d}" for i in range(12)]
    draws = {tuple(held_out(ids, 4, s)) for s in range(5)}
    assert len(draws) > 1 and all(len(d) == 4 and set(d) <= set(ids) for d in draws)
    assert held_out(ids, 4, 3) == held_out(ids, 4, 3)
    with pytest.raises(ValueError, match="leave training cases"):
        held_out(ids, 12, 0)


def test_spread_gives_mean_sd_and_the_values():
    s = spread(_runs([0.90, 0.92, 0.94], [0.95, 0.95, 0.95]))
    wt = s["split"]["dice"]["WT"]
    assert wt["values"] == [0.90, 0.92, 0.94]
    assert wt["mean"] == pytest.approx(0.92) and wt["sd"] == pytest.approx(0.02)
    assert s["seeds"] == [0, 1, 2] and set(s) >= {"split", "centralized", "centralized_matched"}


def test_a_claim_holds_only_beyond_one_sd():
    # gaps 0.00, 0.02, 0.04: mean 0.02 <= 0.03, but mean + sd = 0.04 > 0.03: does not hold beyond one sd
    checks = seed_checks(spread(_runs([0.95, 0.93, 0.91], [0.95, 0.95, 0.95])))
    within = next(c for c in checks if "within" in c["claim"])
    assert within["holds"] is False and "gap +0.020 ± 0.020" in within["measured"]
    assert "centralized matched" in within["measured"]  # judged against the matched-capacity baseline
    # tight gaps: holds
    checks = seed_checks(spread(_runs([0.95, 0.95, 0.94], [0.95, 0.96, 0.95])))
    assert all(c["holds"] for c in checks)
    # the split model far ahead of the upper bound on every seed: the upper-bound claim fails
    checks = seed_checks(spread(_runs([0.95, 0.96, 0.95], [0.85, 0.86, 0.88])))
    upper = next(c for c in checks if "upper bound" in c["claim"])
    assert upper["holds"] is False
    assert seed_checks(spread(_runs([0.9], [0.9])))[0]["holds"] is None  # one seed: not measured


def test_merge_checks_replaces_the_one_run_comparisons():
    one_run = [{"claim": "Split-U-Net within 0.03 WT Dice of centralized", "holds": True, "measured": ""},
               {"claim": "centralized U-Net (the upper bound) at least as good", "holds": True, "measured": ""},
               {"claim": "undefended leakage high", "holds": True, "measured": ""}]
    merged = merge_checks(one_run, spread(_runs([0.9, 0.91], [0.9, 0.92])))
    assert [c["claim"].startswith("over seeds") for c in merged] == [True, True, False]
    assert merge_checks(one_run, spread(_runs([0.9], [0.9]))) == one_run


def test_more_seeds_trains_each_seed_on_its_own_split(tmp_path, brats):
    ids = brats.write_cohort(tmp_path / "cohort", 4)
    plan = {"model": {"spatial_dims": 2, "features": [4, 8, 8, 16], "cut_level": 0}, "roi": [16, 16],
            "batch_size": 2, "steps": 2, "seed": 0, "fg_ratio": 0.5, "flip_prob": 0.5, "loss": "dice_ce",
            "site_optimizer": {"lr": 1e-3}, "server_optimizer": {"lr": 1e-3}}
    posted = []

    def post_job(changes):  # stands in for the REST job: records what the demo would post
        posted.append(changes)
        return {"validation": _fig(0.9)}

    first = SeedRun(seed=5, val_ids=[ids[0]], figures={"split": _fig(0.9)})
    runs = more_seeds(first, 3, post_job=post_job, source=tmp_path / "cohort", case_ids=ids, plan=plan, threads=1)
    assert [r.seed for r in runs] == [5, 6, 7] and [p["seed"] for p in posted] == [6, 7]
    for run, job in zip(runs[1:], posted, strict=True):
        assert job["val_cases"] == run.val_ids and len(run.val_ids) == 1
        assert set(run.figures) == {"split", "centralized", "centralized_matched"}
        assert [c["case_id"] for c in run.figures["centralized_matched"]["per_case"]] == run.val_ids
