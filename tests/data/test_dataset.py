"""BratsDataset: thin composition of the loader, the planners and extract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from splitunet.config import parse_sites
from splitunet.data.cache import ArrayCache
from splitunet.data.dataset import BratsDataset
from splitunet.data.layout import discover_cases
from splitunet.data.loader import load_images, load_regions
from splitunet.data.sampling import Sample, extract
from splitunet.errors import CaseNotFoundError


def test_3d_per_site_items_match_the_functions(cohort2021: Path) -> None:
    sites = parse_sites("a=t1,t1ce b=flair")
    cache = ArrayCache()
    ds = BratsDataset(
        cohort2021, sites=sites, roi=(16, 16, 16), samples_per_case=2, fg_ratio=1.0, flip_prob=0.5, cache=cache
    )
    assert len(ds) == 6 and ds.modalities == ("t1", "t1ce", "flair")
    item = ds[3]
    sample = Sample.model_validate_json(item["sample"])
    case = discover_cases(cohort2021)[item["case_id"]]
    assert item["case_id"] == ds.cases[1].case_id
    assert item["images"]["a"].shape == (2, 16, 16, 16) and item["images"]["b"].shape == (1, 16, 16, 16)
    np.testing.assert_array_equal(item["images"]["a"].numpy(), extract(load_images(case, ["t1", "t1ce"]).array, sample))
    np.testing.assert_array_equal(item["regions"].numpy(), extract(load_regions(case), sample))
    assert item["regions"].dtype == torch.float32 and item["regions"][1].sum() > 0  # fg_ratio=1: tumour inside
    # each file is decoded once: case 1's images and labels; another sample of case 1 loads nothing
    assert cache.stats.loads == 2
    ds[2]
    assert cache.stats.loads == 2
    # deterministic per (seed, epoch, index); a new epoch draws new plans
    epoch0 = [ds.sample(i) for i in range(6)]
    assert ds.sample(3) == sample and epoch0 == [ds.sample(i) for i in range(6)]
    ds.set_epoch(1)
    assert [ds.sample(i) for i in range(6)] != epoch0
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["images"]["a"].shape == (2, 2, 16, 16, 16) and batch["regions"].shape == (2, 3, 16, 16, 16)


def test_fused_whole_volume_and_2d(cohort2021: Path, brats) -> None:
    full = BratsDataset(cohort2021)
    item = full[0]
    assert item["images"].shape == (4, *brats.SHAPE) and item["regions"].shape == (3, *brats.SHAPE)
    case = discover_cases(cohort2021)[item["case_id"]]
    np.testing.assert_array_equal(item["images"].numpy(), load_images(case).array)
    slices = BratsDataset(cohort2021, spatial_dims=2, roi=(32, 32), samples_per_case=4, random_crop=False)
    for i in range(len(slices)):
        it = slices[i]
        s = Sample.model_validate_json(it["sample"])
        assert it["images"].shape == (4, 32, 32) and it["regions"].shape == (3, 32, 32)
        assert it["images"].abs().sum() > 0  # brain slices only
        assert s.start == (-4, -4)
    resized = BratsDataset(cohort2021, spatial_dims=2, roi=(16, 16), samples_per_case=2, resize=True, fg_ratio=1.0)
    for i in range(len(resized)):
        it = resized[i]
        s = Sample.model_validate_json(it["sample"])
        assert s.resize == (16, 16) and s.size == tuple(brats.SHAPE[:2])
        assert it["images"].shape == (4, 16, 16) and it["regions"].shape == (3, 16, 16)
        assert set(np.unique(it["regions"].numpy())) <= {0.0, 1.0} and it["regions"][1].sum() > 0
    with pytest.raises(ValueError, match="resize needs spatial_dims=2"):
        BratsDataset(cohort2021, resize=True, roi=(16, 16, 16))


def test_case_selection_and_bad_arguments(cohort2021: Path) -> None:
    ids = list(discover_cases(cohort2021))
    ds = BratsDataset(cohort2021, case_ids=[ids[2]])
    assert len(ds) == 1 and ds[0]["case_id"] == ids[2]
    with pytest.raises(CaseNotFoundError):
        BratsDataset(cohort2021, case_ids=["BraTS2021_99999"])
    with pytest.raises(CaseNotFoundError):
        ds.fetch(Sample(case_id=ids[0], start=(0, 0, 0), size=(4, 4, 4)))
    with pytest.raises(ValueError, match="roi must have 2"):
        BratsDataset(cohort2021, spatial_dims=2, roi=(8, 8, 8))
    with pytest.raises(ValueError, match="fg_ratio"):
        BratsDataset(cohort2021, fg_ratio=2.0)
    with pytest.raises(IndexError):
        ds.sample(5)
