"""Connected-component post-processing chosen on validation cases, as nnU-Net chooses it.

For each region (WT first, then TC, ET) the candidates are: leave the mask as predicted, keep only its largest
connected component, or drop its components under ``s`` voxels (``s`` in :data:`MIN_SIZES`). A candidate is
chosen only if, on the cases it is chosen on, it lowers the region's mean HD95 by at least :data:`MIN_GAIN_MM`
without lowering its mean Dice by more than :data:`DICE_TOLERANCE`; among those, the lowest mean HD95 wins. Every
region is judged on its own (regions are channels, not nested labels, in the metrics).

What the report shows (:func:`cross_validated`): the raw figures, and the post-processed figures where each case
is processed by the rule chosen on the *other* validation cases (leave one out), so that no case's figure comes
from a rule chosen on that case; and the rule chosen on all of them, the one a deployment would apply.

Layouts: masks are boolean ``(3, X, Y, Z)`` ``[TC, WT, ET]``; spacing ``(sx, sy, sz)`` in mm; connectivity is
26-neighbourhood (3D) / 8 (2D), as nnU-Net's.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from splitunet.config import REGIONS
from splitunet.metrics import RegionMetrics, dice, hd95_mm

#: Component-size thresholds (voxels) tried for "drop components under s voxels".
MIN_SIZES = (10, 50, 200, 1000)
#: A rule must lower the region's mean HD95 by at least this much (mm) on the cases it is chosen on.
MIN_GAIN_MM = 0.1
#: ... and must not lower the region's mean Dice by more than this.
DICE_TOLERANCE = 1e-3
#: Regions in the order they are chosen (WT first: its false positives are the ones that matter most).
ORDER = ("WT", "TC", "ET")


@dataclass(frozen=True)
class Rule:
    """One region's post-processing: ``kind`` ``none`` | ``largest`` | ``min_size`` (with ``min_size`` voxels)."""

    kind: str = "none"
    min_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "largest", "min_size"):
            raise ValueError(f"kind must be none, largest or min_size, got {self.kind!r}")
        if (self.kind == "min_size") != (self.min_size > 0):
            raise ValueError(f"min_size must be > 0 exactly for kind min_size, got {self.kind}/{self.min_size}")

    def __str__(self) -> str:
        return {"none": "none", "largest": "largest component"}.get(self.kind, f"drop < {self.min_size} voxels")

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """The processed copy of one region's boolean mask ``(X, Y, Z)`` (or ``(X, Y)``)."""
        mask = np.asarray(mask, dtype=bool)
        if self.kind == "none" or not mask.any():
            return mask.copy()
        labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
        sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
        sizes[0] = 0
        keep = sizes == sizes.max() if self.kind == "largest" else sizes >= self.min_size
        keep[0] = False
        return keep[labels]


CANDIDATES = (Rule(), Rule("largest"), *(Rule("min_size", s) for s in MIN_SIZES))


def apply_rules(masks: np.ndarray, rules: dict[str, Rule]) -> np.ndarray:
    """``masks`` ``(3, *spatial)`` with each region's rule applied (regions without a rule unchanged)."""
    out = np.array(masks, dtype=bool, copy=True)
    for i, region in enumerate(REGIONS):
        if region in rules:
            out[i] = rules[region].apply(out[i])
    return out


@dataclass
class _Scores:
    """(Dice, HD95 mm) of every candidate, region and case: ``table[c][region][case]``."""

    table: list[dict[str, list[tuple[float, float]]]]


def _score(masks: Sequence[np.ndarray], truths: Sequence[np.ndarray], spacings: Sequence[Sequence[float]]) -> _Scores:
    # candidates often give the same mask (one component: every rule keeps it): each distinct mask is scored once
    seen: dict[tuple[int, int], list[tuple[np.ndarray, tuple[float, float]]]] = {}
    table = []
    for rule in CANDIDATES:
        per_region: dict[str, list[tuple[float, float]]] = {}
        for i, region in enumerate(REGIONS):
            row = []
            for j, (m, t, s) in enumerate(zip(masks, truths, spacings, strict=True)):
                p, tt = rule.apply(m[i]), np.asarray(t[i]) > 0.5
                done = seen.setdefault((i, j), [])
                score = next((sc for q, sc in done if np.array_equal(p, q)), None)
                if score is None:
                    score = (dice(p, tt), hd95_mm(p, tt, s))
                    done.append((p, score))
                row.append(score)
            per_region[region] = row
        table.append(per_region)
    return _Scores(table)


def _choose(scores: _Scores, cases: Sequence[int]) -> dict[str, Rule]:
    rules = {}
    for region in ORDER:
        def mean(c: int, k: int, region: str = region) -> float:
            return statistics.fmean(scores.table[c][region][i][k] for i in cases)

        best, best_hd = 0, mean(0, 1)
        raw_dice = mean(0, 0)
        for c in range(1, len(CANDIDATES)):
            hd = mean(c, 1)
            if hd <= best_hd - MIN_GAIN_MM and mean(c, 0) >= raw_dice - DICE_TOLERANCE:
                best, best_hd = c, hd
        rules[region] = CANDIDATES[best]
    return rules


def choose_rules(masks: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                 spacings: Sequence[Sequence[float]]) -> dict[str, Rule]:
    """The rule per region chosen on these validation cases (see the module docstring)."""
    return _choose(_score(masks, truths, spacings), range(len(masks)))


def cross_validated(case_ids: Sequence[str], masks: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                    spacings: Sequence[Sequence[float]]) -> dict:
    """Raw and post-processed figures of the validation cases.

    Returns ``{"raw": agg, "postprocessed": agg, "rules": {region: str}, "rules_per_case": {case: {region: str}},
    "method": str}``; ``agg`` is :meth:`splitunet.metrics.RegionMetrics.aggregate`'s dict (Dice and HD95 means,
    medians, per case). With one case there is nothing to choose on: its post-processed figures are its raw ones.
    """
    if not (len(case_ids) == len(masks) == len(truths) == len(spacings)) or not case_ids:
        raise ValueError("need one mask, truth and spacing per case, and at least one case")
    scores = _score(masks, truths, spacings)
    index = {rule: c for c, rule in enumerate(CANDIDATES)}
    raw, post = RegionMetrics(hd95=True), RegionMetrics(hd95=True)
    per_case = {}
    n = len(case_ids)
    for j, case_id in enumerate(case_ids):
        others = [i for i in range(n) if i != j]
        rules = _choose(scores, others) if others else {r: Rule() for r in ORDER}
        per_case[case_id] = {r: str(rule) for r, rule in rules.items()}
        raw.cases.append(_case_result(case_id, scores, j, dict.fromkeys(REGIONS, 0)))  # candidate 0: as predicted
        post.cases.append(_case_result(case_id, scores, j, {r: index[rule] for r, rule in rules.items()}))
    return {"raw": raw.aggregate(), "postprocessed": post.aggregate(),
            "rules": {r: str(rule) for r, rule in _choose(scores, range(n)).items()},
            "rules_per_case": per_case,
            "method": "per region: none, largest connected component, or drop components under "
                      f"{list(MIN_SIZES)} voxels; chosen if it lowers the mean HD95 by >= {MIN_GAIN_MM} mm without "
                      f"lowering the mean Dice by > {DICE_TOLERANCE}; each case processed by the rule chosen on the "
                      "other validation cases (leave one out)"}


def _case_result(case_id: str, scores: _Scores, case: int, chosen: dict[str, int]):
    from splitunet.metrics import CaseResult

    return CaseResult(case_id=case_id, dice={r: scores.table[chosen[r]][r][case][0] for r in REGIONS},
                      hd95={r: scores.table[chosen[r]][r][case][1] for r in REGIONS})
