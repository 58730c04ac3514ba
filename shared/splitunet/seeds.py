"""The demo's headline comparison over several seeds: figures with their spread, and claims judged beyond one sd.

``splitunet demo --seeds N`` repeats the comparison (the Split-U-Net over REST against the centralized U-Nets, equal
width and matched capacity) with seeds ``seed, seed+1, ..., seed+N-1``. Seed ``s`` varies the sites' and the
aggregator's initialisation and sampling (the job's ``seed``) and the data split: the held-out cases are drawn
from the cohort by ``s`` (:func:`held_out`; the first seed keeps the demo's own partition). The services keep
running between seeds: every site holds every case's images, so only the job spec changes.

``report["seeds"]`` (:func:`spread`): the seeds, and per model (``split``, ``centralized``,
``centralized_matched``) and figure (``dice``, ``hd95``) per region ``{"mean", "sd", "values"}`` (sd: the sample
standard deviation, n-1). :func:`seed_checks` states the headline claims on them: a claim holds only if it holds
beyond one sd of the per-seed differences.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitunet.config import REGIONS

logger = logging.getLogger(__name__)

#: The models of the headline comparison (the baselines are trained in process for every seed).
MODELS = ("split", "centralized", "centralized_matched")
#: The claims' margin on WT Dice (as the single-run checks: :data:`splitunet.report.summary.WT_MARGIN`).
WT_MARGIN = 0.03


@dataclass
class SeedRun:
    """One seed's validation figures per model (:meth:`splitunet.metrics.RegionMetrics.aggregate`'s dicts)."""

    seed: int
    val_ids: list[str]
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)


def held_out(case_ids: Sequence[str], n_val: int, seed: int) -> list[str]:
    """``n_val`` held-out cases drawn from ``case_ids`` by ``seed`` (sorted)."""
    if not 1 <= n_val < len(case_ids):
        raise ValueError(f"n_val must be in 1..{len(case_ids) - 1} (leave training cases), got {n_val}")
    rng = np.random.default_rng([seed, 23])
    return sorted(str(c) for c in rng.choice(sorted(case_ids), size=n_val, replace=False))


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def spread(runs: Sequence[SeedRun]) -> dict[str, Any]:
    """Mean, sd and per-seed values of every model's Dice and HD95 per region over ``runs``."""
    out: dict[str, Any] = {"seeds": [r.seed for r in runs], "val_ids": {str(r.seed): r.val_ids for r in runs}}
    for model in MODELS:
        have = [r for r in runs if r.figures.get(model)]
        if len(have) != len(runs):
            continue
        out[model] = {}
        for figure in ("dice", "hd95"):
            if all(r.figures[model].get(figure) for r in runs):
                out[model][figure] = {reg: _stats([float(r.figures[model][figure][reg]) for r in runs])
                                      for reg in (*REGIONS, "mean")}
    return out


def seed_checks(seeds: dict[str, Any], *, margin: float = WT_MARGIN) -> list[dict[str, Any]]:
    """The headline claims over seeds, on WT Dice: the gap ``centralized - split`` per seed (matched capacity when
    measured), its mean ± sd; "within ``margin``" holds if mean + sd <= margin, "the upper bound at least as good"
    if mean - sd >= -margin; ``None`` when fewer than two seeds were measured."""
    n = len(seeds.get("seeds") or [])
    which = "centralized_matched" if "centralized_matched" in seeds else "centralized"
    if n < 2 or "split" not in seeds or which not in seeds:
        why = "fewer than two seeds measured" if n < 2 else (
            "the Split-U-Net and a centralized baseline were not both measured on every seed (--no-baselines?)")
        return [{"claim": f"over seeds: Split-U-Net within {margin} WT Dice of centralized", "holds": None,
                 "measured": why}]
    split = seeds["split"]["dice"]["WT"]["values"]
    central = seeds[which]["dice"]["WT"]["values"]
    gaps = [c - s for c, s in zip(central, split, strict=True)]
    gap = _stats(gaps)
    measured = (f"{n} seeds; split WT {_fmt(seeds['split']['dice']['WT'])}, {which.replace('_', ' ')} "
                f"{_fmt(seeds[which]['dice']['WT'])}; gap {gap['mean']:+.3f} ± {gap['sd']:.3f} (per seed "
                + ", ".join(f"{g:+.3f}" for g in gaps) + ")")
    return [
        {"claim": f"over seeds: Split-U-Net within {margin} WT Dice of centralized (beyond one sd)",
         "holds": gap["mean"] + gap["sd"] <= margin, "measured": measured},
        {"claim": "over seeds: centralized U-Net (the upper bound) at least as good as Split-U-Net on WT Dice "
                  "(beyond one sd)",
         "holds": gap["mean"] - gap["sd"] >= -margin, "measured": measured},
    ]


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f} ± {s['sd']:.3f}"


def run_seed(
    seed: int, val_ids: list[str], *, train_split: Callable[[dict[str, Any]], dict[str, Any]], source: Path,
    case_ids: Sequence[str], plan: dict[str, Any], device: str = "cpu", threads: int | None = None,
) -> SeedRun:
    """One extra seed: the baselines train in a background thread while ``train_split`` (given the job spec's
    changes ``{"seed", "val_cases", "run_id"}``, it trains the Split-U-Net over REST and returns the job's final
    status) runs."""
    from splitunet.baseline_training import BackgroundBaselines

    train_ids = [c for c in case_ids if c not in set(val_ids)]
    with BackgroundBaselines(source, train_ids, val_ids, plan | {"seed": seed}, device=device, threads=threads,
                             which=list(MODELS[1:])) as background:
        status = train_split({"seed": seed, "val_cases": val_ids, "run_id": f"seed-{seed}"})
        baselines = background.result()
    run = SeedRun(seed=seed, val_ids=val_ids, figures={"split": status.get("validation") or {}})
    run.figures |= {name: b.validation for name, b in baselines.items()}
    logger.info("seed %d: split WT %s", seed, (run.figures["split"].get("dice") or {}).get("WT"))
    return run


def merge_checks(checks: list[dict[str, Any]], seeds: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's checks with the seed checks in place of the one-run WT comparisons (when two or more seeds were
    measured; otherwise unchanged)."""
    if len(seeds.get("seeds") or []) < 2:
        return checks
    single_run = ("Split-U-Net within", "centralized U-Net (the upper bound)")
    return seed_checks(seeds) + [c for c in checks if not c["claim"].startswith(single_run)]


def first_run(seed: int, val_ids: Sequence[str], status: dict[str, Any], baselines: dict[str, Any]) -> SeedRun:
    """The demo's main run as the first seed (the split job's final status, the baselines' results)."""
    run = SeedRun(seed=seed, val_ids=list(val_ids), figures={"split": status.get("validation") or {}})
    run.figures |= {n: b.validation for n, b in baselines.items() if n in MODELS}
    return run


def more_seeds(
    first: SeedRun, count: int, *, post_job: Callable[[dict[str, Any]], dict[str, Any]], source: Path,
    case_ids: Sequence[str], plan: dict[str, Any], device: str = "cpu", threads: int | None = None,
    on_seed: Callable[[int], None] | None = None,
) -> list[SeedRun]:
    """``first`` and ``count - 1`` more seeds (``first.seed + 1, ...``), each with its own held-out cases
    (:func:`held_out`, as many as ``first``'s); ``post_job(changes)`` trains the split job with the spec's
    changes and returns its final status."""
    if count < 1:
        raise ValueError(f"seeds must be >= 1, got {count}")
    runs = [first]
    for k in range(1, count):
        seed = first.seed + k
        if on_seed is not None:
            on_seed(seed)
        runs.append(run_seed(seed, held_out(case_ids, len(first.val_ids), seed), train_split=post_job,
                             source=source, case_ids=case_ids, plan=plan, device=device, threads=threads))
    return runs
