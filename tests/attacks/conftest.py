"""Phantom 2D slices for the attack calibration tests: a federation cohort and a disjoint public cohort.

128 x 128 axial slices (phantom volumes of 128 x 128 x 80 voxels) through the tumour's neighbourhood, z-scored
inside the brain like the sites' preprocessing. Generated once per session (about 10 s).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from phantom_slices import SHAPE, Slices

from splitunet.auditing.cohorts import PublicCohort
from splitunet.data.sampling import Sample


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # robust on a shared machine (no spinning threads); the benchmark measures 2
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def slices() -> Slices:
    federation = PublicCohort(SHAPE, 2, seed=1)  # another seed than the public cohort: disjoint cases
    public = PublicCohort(SHAPE, 12)
    samples = [Sample(case_id=f"case-{i}", start=(0, 0), size=SHAPE[:2], axial_index=z, volume_shape=SHAPE)
               for i, z in enumerate((38, 44))]
    images = np.stack([federation.images([s], ["t1", "t1ce", "t2", "flair"])[i, 0] for i, s in enumerate(samples)])
    regions = np.stack([federation.regions([s])[i, 0] for i, s in enumerate(samples)])
    return Slices(images=images, regions=regions.astype(np.float32), samples=samples, public=public,
                  federation=federation)
