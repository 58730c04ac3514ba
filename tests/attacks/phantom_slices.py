"""Helpers of the attack tests (fixtures are in this folder's ``conftest.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitunet.auditing.cohorts import PublicCohort
from splitunet.config import SiteSpec, SplitUNetConfig
from splitunet.data.sampling import Sample

SHAPE = (128, 128, 80)


@dataclass(frozen=True)
class Slices:
    """``images (B, 4, 128, 128)`` float32 (t1, t1ce, t2, flair), ``regions (B, 3, 128, 128)``, the samples, the
    public cohort cut like them, and the federation's two cases (``case-0``, ``case-1``) they come from."""

    images: np.ndarray
    regions: np.ndarray
    samples: list[Sample]
    public: PublicCohort
    federation: PublicCohort


def site_config(cut_level: int = 0, skips: str = "all", site: str = "t1") -> SplitUNetConfig:
    return SplitUNetConfig(spatial_dims=2, features=(16, 32, 64, 128), sites=(SiteSpec(name=site, modalities=(site,)),),
                           cut_level=cut_level, skips=skips)
