"""The demo's in-process baselines: every model trained on the same batches and evaluated per case, per-phase
timing reported, torch's thread setting applied while they train and restored after."""

from __future__ import annotations

import os
import time

import pytest
import torch

from splitunet.baseline_training import BackgroundBaselines, BaselinesStopped, train_baselines
from splitunet.demo import baseline_threads

PLAN = {"model": {"spatial_dims": 2, "features": [4, 8, 8, 16], "cut_level": 0}, "roi": [16, 16], "batch_size": 2,
        "steps": 2, "seed": 0, "fg_ratio": 0.5, "flip_prob": 0.5, "loss": "dice_ce",
        "site_optimizer": {"lr": 1e-3}, "server_optimizer": {"lr": 1e-3}}


def test_baselines_train_evaluate_and_restore_threads(tmp_path, brats):
    ids = brats.write_cohort(tmp_path / "cohort", 3)
    before = torch.get_num_threads()
    seen = []
    results = train_baselines(tmp_path / "cohort", ids[:2], ids[2:], PLAN, which=["centralized", "flair"],
                              threads=1, on_step=lambda name, step, steps, loss: seen.append(
                                  (name, step, torch.get_num_threads())))
    assert torch.get_num_threads() == before
    assert seen == [("centralized", 1, 1), ("flair", 1, 1), ("centralized", 2, 1), ("flair", 2, 1)]
    for name, result in results.items():
        assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses), name
        assert set(result.validation["dice"]) == {"TC", "WT", "ET", "mean"}
        assert [c["case_id"] for c in result.validation["per_case"]] == ids[2:]
        assert result.seconds > 0 and result.eval_s > 0 and result.data_s > 0
    assert results["centralized"].data_s == results["flair"].data_s  # one batch load serves every model


def test_bad_thread_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="threads must be >= 1"):
        train_baselines(tmp_path, [], [], PLAN, threads=0)


def test_baseline_threads_leave_a_core_to_the_services():
    cores = len(os.sched_getaffinity(0))
    assert baseline_threads("cpu", concurrent=False) == cores
    assert baseline_threads("cpu", concurrent=True) == max(1, cores - 1)
    assert baseline_threads("cuda", concurrent=True) is None


def test_background_baselines_give_their_result_or_stop_at_the_next_step(tmp_path, brats):
    ids = brats.write_cohort(tmp_path / "cohort", 3)
    with BackgroundBaselines(tmp_path / "cohort", ids[:2], ids[2:], PLAN, which=["t2"], threads=1) as job:
        results = job.result()
    assert list(results) == ["t2"] and len(results["t2"].losses) == 2 and job.seconds > 0
    steps = []
    long_plan = PLAN | {"steps": 10_000}
    job = BackgroundBaselines(tmp_path / "cohort", ids[:2], ids[2:], long_plan, which=["t2"],
                              on_step=lambda name, step, total, loss: steps.append(step))
    while not steps:
        time.sleep(0.01)
    job.stop()  # returns once the thread ended (Ctrl-C must not wait for 10,000 steps)
    with pytest.raises(BaselinesStopped, match="stopped at step"):
        job.result()
    assert len(steps) < 10_000
