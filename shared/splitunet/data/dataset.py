"""In-process convenience: a torch ``Dataset`` of planned samples from a full cohort folder.

For tests, baselines and centralised training, where one process holds every modality and the
segmentations. It is built only from the layer's functions (:func:`~splitunet.data.loader.scan_cohort`,
:func:`~splitunet.data.loader.load_images`, :func:`~splitunet.data.loader.load_labels`, the planners and
:func:`~splitunet.data.sampling.extract`), so what it yields is exactly what the sites and the aggregator
compute from the same :class:`~splitunet.data.sampling.Sample`.

Item ``i`` is sample ``i % samples_per_case`` of case ``i // samples_per_case``; its plan is drawn from
``np.random.default_rng([seed, epoch, i])`` (call :meth:`BratsDataset.set_epoch` each epoch), so a run is
reproducible and DataLoader workers need no shared random state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from splitunet.config import MODALITIES, SiteSpec
from splitunet.data.cache import ArrayCache
from splitunet.data.cohort import CaseCheck, scan_cohort
from splitunet.data.grid import axial_extent, brain_slices
from splitunet.data.layout import BratsCase, OnBadCase
from splitunet.data.loader import labels_to_regions, load_images, load_labels
from splitunet.data.sampling import Sample, extract, foreground_mask, plan_patches, plan_slices
from splitunet.errors import CaseNotFoundError


class BratsDataset(Dataset):
    """Planned samples of a cohort whose folder holds all modalities and the segmentations.

    Args:
        root: the cohort folder.
        sites: if given, ``images`` is a dict ``site name -> (C_site, *roi)`` tensor holding that site's
            modalities; if ``None``, ``images`` is one ``(4, *roi)`` tensor of ``t1, t1ce, t2, flair``.
        spatial_dims: 3 (crops ``(x, y, z)``) or 2 (axial slices, in-plane crop ``(x, y)``).
        roi: crop size; ``None`` for whole volumes (3D) or whole slices (2D).
        samples_per_case: samples per case per epoch.
        fg_ratio: probability of centring a sample on a tumour voxel.
        flip_prob: probability of flipping each spatial axis.
        brain_slices_only: 2D only: draw only slices inside the brain's axial extent (nonzero image voxels).
        resize: 2D only: take whole slices resized to ``roi`` (bilinear images, nearest labels) instead of crops.
        random_crop: ``False`` centres the crops (validation).
        seed: base seed of the plans.
        case_ids: restrict to these cases (e.g. the training or the held-out list); unknown ids raise.
        cache: decoded-array cache (default: a private one of at most 16 entries / 2 GiB).
        on_bad_case, check: passed to :func:`~splitunet.data.loader.scan_cohort`.

    Items are dicts: ``case_id`` (str), ``images`` (float32 tensor or dict of them), ``regions`` (float32
    ``(3, *roi)``, channels ``[TC, WT, ET]``) and ``sample`` (the :class:`Sample` as a JSON string).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        sites: Sequence[SiteSpec] | None = None,
        spatial_dims: int = 3,
        roi: Sequence[int] | None = None,
        samples_per_case: int = 1,
        fg_ratio: float = 0.0,
        flip_prob: float = 0.0,
        brain_slices_only: bool = True,
        resize: bool = False,
        random_crop: bool = True,
        seed: int = 0,
        case_ids: Sequence[str] | None = None,
        cache: ArrayCache | None = None,
        on_bad_case: OnBadCase | str = OnBadCase.RAISE,
        check: CaseCheck | str = CaseCheck.HEADER,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if samples_per_case < 1:
            raise ValueError(f"samples_per_case must be >= 1, got {samples_per_case}")
        if not 0.0 <= fg_ratio <= 1.0:
            raise ValueError(f"fg_ratio must be in [0, 1], got {fg_ratio}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if resize and (spatial_dims != 2 or roi is None):
            raise ValueError("resize needs spatial_dims=2 and a roi (the in-plane size to resize slices to)")
        if roi is not None and len(roi) != spatial_dims:
            raise ValueError(f"roi must have {spatial_dims} sizes for spatial_dims={spatial_dims}, got {list(roi)}")
        self.sites = tuple(sites) if sites is not None else None
        self.modalities = (
            tuple(m for m in MODALITIES if any(m in s.modalities for s in self.sites))
            if self.sites is not None
            else MODALITIES
        )
        self.spatial_dims = spatial_dims
        self.roi = tuple(int(r) for r in roi) if roi is not None else None
        self.samples_per_case = samples_per_case
        self.fg_ratio = fg_ratio
        self.flip_prob = flip_prob
        self.brain_slices_only = brain_slices_only
        self.resize = resize
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.cache = cache if cache is not None else ArrayCache(max_items=16, max_bytes=2 * 2**30)
        scan = scan_cohort(root, modalities=self.modalities, seg=True, on_bad_case=on_bad_case, check=check)
        self.skipped = dict(scan.skipped)
        if case_ids is None:
            self.cases: tuple[BratsCase, ...] = tuple(scan.cases.values())
        else:
            self.cases = tuple(scan.case(c) for c in case_ids)
        self._by_id = {c.case_id: c for c in self.cases}
        self._plans: dict[str, tuple[tuple[int, ...], np.ndarray | None, np.ndarray | None]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the plans of ``epoch`` (each epoch draws new crops and flips)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def sample(self, index: int) -> Sample:
        """The :class:`Sample` item ``index`` uses in the current epoch (loads the case's labels)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        case = self.cases[index // self.samples_per_case]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        shape, foreground, allowed = self._planning(case)
        common: dict[str, Any] = {
            "foreground": foreground,
            "fg_ratio": self.fg_ratio,
            "flip_prob": self.flip_prob,
            "random_crop": self.random_crop,
        }
        if self.spatial_dims == 3:
            return plan_patches(case.case_id, shape, self.roi, 1, rng, **common)[0]
        return plan_slices(
            case.case_id, shape, self.roi, 1, rng, allowed_slices=allowed, resize=self.resize, **common
        )[0]

    def _planning(self, case: BratsCase) -> tuple[tuple[int, ...], np.ndarray | None, np.ndarray | None]:
        """What planning a sample of ``case`` needs, computed once per case (a scan of the whole volume each
        time cost more than the crop itself): the label map's shape, the tumour voxels' ``(N, 3)`` coordinates
        (None without ``fg_ratio``) and, in 2D with ``brain_slices_only``, the brain's axial slices."""
        found = self._plans.get(case.case_id)
        if found is None:
            labels = load_labels(case, cache=self.cache).label_map
            foreground = np.argwhere(foreground_mask(labels)) if self.fg_ratio > 0 else None
            allowed = None
            if self.spatial_dims == 2 and self.brain_slices_only:  # the federated planner's rule (data.grid)
                allowed = brain_slices(axial_extent(load_images(case, self.modalities, cache=self.cache).array))
            found = self._plans[case.case_id] = (tuple(labels.shape), foreground, allowed)
        return found

    def fetch(self, sample: Sample) -> dict[str, Any]:
        """The item for an explicit ``sample`` (same layout as ``self[i]``)."""
        case = self._by_id.get(sample.case_id)
        if case is None:
            raise CaseNotFoundError(
                f"case {sample.case_id!r} is not in this dataset", detail={"case_id": sample.case_id}
            )
        images = load_images(case, self.modalities, cache=self.cache)
        labels = load_labels(case, cache=self.cache, reference=images)
        crop = extract(images.array, sample)
        label_map = extract(labels.label_map[None], sample, interpolation="nearest")[0]
        regions = labels_to_regions(label_map, case.et_label)
        if self.sites is None:
            image_out: torch.Tensor | dict[str, torch.Tensor] = torch.from_numpy(crop)
        else:
            image_out = {
                s.name: torch.from_numpy(np.ascontiguousarray(crop[[self.modalities.index(m) for m in s.modalities]]))
                for s in self.sites
            }
        return {
            "case_id": case.case_id,
            "images": image_out,
            "regions": torch.from_numpy(regions.astype(np.float32)),
            "sample": sample.model_dump_json(),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.fetch(self.sample(index))
