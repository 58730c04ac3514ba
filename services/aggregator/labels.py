"""The aggregator's labels: segmentations discovered in its data folder, decoded once and cached."""

from __future__ import annotations

import numpy as np

from services.aggregator.settings import AggregatorSettings
from splitunet.data.cache import ArrayCache, file_signature
from splitunet.data.cohort import scan_cohort
from splitunet.data.layout import BratsCase
from splitunet.data.loader import labels_to_regions, load_labels, read_geometry
from splitunet.errors import CaseNotFoundError
from splitunet.metrics import spacing_from_affine


class LabelStore:
    """Region channels per case: ``(3, X, Y, Z)`` uint8 [TC, WT, ET], RAS, from each case's segmentation."""

    def __init__(self, settings: AggregatorSettings) -> None:
        scan = scan_cohort(settings.data_dir, seg=True, on_bad_case=settings.on_bad_case)
        self.cases: dict[str, BratsCase] = dict(scan.cases)
        self.skipped = len(scan.skipped)
        self.cache = ArrayCache(max_items=settings.cache_cases)

    def case(self, case_id: str) -> BratsCase:
        case = self.cases.get(case_id)
        if case is None:
            raise CaseNotFoundError(f"the aggregator has no segmentation for case {case_id!r}")
        return case

    def regions(self, case_id: str) -> np.ndarray:
        """``(3, X, Y, Z)`` uint8 region channels of a case (cached)."""
        case = self.case(case_id)

        def load() -> dict[str, np.ndarray]:
            label_map = load_labels(case).label_map
            return {"regions": labels_to_regions(label_map, case.et_label)}

        return self.cache.get_or_load(("regions", case_id, file_signature(case.seg_path())), load)["regions"]

    def spacing(self, case_id: str) -> tuple[float, float, float]:
        """Voxel size in mm along the RAS array axes, from the segmentation's header (cached)."""
        case = self.case(case_id)

        def load() -> dict[str, np.ndarray]:
            geometry = read_geometry(case_id, case.seg_path())
            return {"spacing": np.asarray(spacing_from_affine(geometry.ras_affine))}

        spacing = self.cache.get_or_load(("spacing", case_id, file_signature(case.seg_path())), load)["spacing"]
        return tuple(float(s) for s in spacing)  # type: ignore[return-value]

    def shape(self, case_id: str) -> tuple[int, int, int]:
        return tuple(self.regions(case_id).shape[1:])  # type: ignore[return-value]
