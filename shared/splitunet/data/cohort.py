"""Checking a whole cohort: which cases are usable for given modalities and segmentation.

:func:`scan_cohort` discovers the cases (:mod:`splitunet.data.layout`), checks each (file headers, or a full
decode) and either raises on the first unusable case or skips and counts them. The site and aggregator services
call it at start-up, so a bad file is reported before any training starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

from splitunet.data.cache import ArrayCache
from splitunet.data.layout import (
    SEG,
    BratsCase,
    CohortScan,
    OnBadCase,
    canonical_requirements,
    parse_option,
    scan_layout,
)
from splitunet.data.loader import check_same_grid, load_images, load_labels, read_geometry
from splitunet.errors import DataError

logger = logging.getLogger(__name__)


class CaseCheck(StrEnum):
    """How thoroughly :func:`scan_cohort` checks each case.

    - ``header``: files open, are 3D, and agree in RAS shape and affine (reads headers only; fast).
    - ``full``: also decodes every file (catches truncated files and bad label values); fills the cache.
    """

    HEADER = "header"
    FULL = "full"


def check_case(
    case: BratsCase,
    modalities: Iterable[str] = (),
    seg: bool = False,
    *,
    check: CaseCheck | str = CaseCheck.HEADER,
    cache: ArrayCache | None = None,
) -> None:
    """Raise a :class:`DataError` naming the case and file if ``case`` is unusable for ``modalities``/``seg``."""
    level = parse_option(CaseCheck, check, "check")
    mods = canonical_requirements(modalities)
    case.check((*mods, *((SEG,) if seg else ())))
    if level is CaseCheck.FULL:
        images = load_images(case, mods, cache=cache) if mods else None
        if seg:
            load_labels(case, cache=cache, reference=images)
        return
    files = [case.image_path(m) for m in mods] + ([case.seg_path()] if seg else [])
    check_same_grid(case.case_id, [(p, read_geometry(case.case_id, p)) for p in files])


def scan_cohort(
    root: Path | str,
    *,
    modalities: Iterable[str] = (),
    seg: bool = False,
    on_bad_case: OnBadCase | str = OnBadCase.RAISE,
    check: CaseCheck | str = CaseCheck.HEADER,
    cache: ArrayCache | None = None,
) -> CohortScan:
    """Discover the cases under ``root`` and check each for ``modalities`` and (if ``seg``) its segmentation.

    With ``on_bad_case="skip"`` every unusable case is logged and left out; ``CohortScan.skipped`` maps each
    skipped case id to its reason and ``num_skipped`` counts them. With ``"raise"`` the first problem raises.
    ``check="full"`` decodes every file (fills ``cache``, ~0.35 s per real case); ``"header"`` does not, so a
    truncated file is then only found when the case is loaded.
    """
    policy = parse_option(OnBadCase, on_bad_case, "on_bad_case")
    level = parse_option(CaseCheck, check, "check")
    mods = canonical_requirements(modalities)
    if SEG in mods:
        raise ValueError("modalities must name image modalities only; pass seg=True for the segmentation")
    layout_scan = scan_layout(root, (*mods, *((SEG,) if seg else ())), policy)
    cases = dict(layout_scan.cases)
    skipped = dict(layout_scan.skipped)
    for case_id, case in list(cases.items()):
        try:
            check_case(case, mods, seg, check=level, cache=cache)
        except DataError as exc:
            if policy is OnBadCase.RAISE:
                raise
            logger.warning("skipping case %s: %s", case_id, exc.message)
            skipped[case_id] = exc.message
            del cases[case_id]
    if len(skipped) > len(layout_scan.skipped):
        logger.warning("skipped %d of %d cases in %s", len(skipped), len(skipped) + len(cases), root)
    if not cases:
        raise DataError(f"no usable BraTS case left in {root}: all {len(skipped)} were skipped")
    return CohortScan(root=Path(root), cases=cases, skipped=dict(sorted(skipped.items())))
