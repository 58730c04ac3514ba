"""The audit's image sources: the public auxiliary cohort (phantom, disjoint from the federation) and, in lab mode,
the federation's own cohort read from disk.

Both return images in the sites' preprocessing (``(C, X, Y, Z)`` float32 z-scored inside the brain, 0 outside,
modalities in the order asked for) and cut them with :func:`splitunet.data.sampling.extract`, so a recorded
sample (case, crop, slice, flips) gives the voxels the site encoded.

The public cohort is generated from a seed no federation's phantom may use (``PUBLIC_SEED``:
:func:`splitunet.data.phantom.write_cohort` refuses it, so its cases are disjoint from the federation's), on the
federation's volume grid: its mean image is the attacks' prior, its images train the learned inversion, its
tumour masks give the label-leakage baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from splitunet.config import MODALITIES
from splitunet.data.layout import discover_cases
from splitunet.data.loader import labels_to_regions, load_images, load_regions, normalize_nonzero
from splitunet.data.phantom import PUBLIC_SEED  # a federation's phantom cannot be written from it
from splitunet.data.sampling import Sample, extract
from splitunet.errors import DataError

__all__ = ["PUBLIC_SEED", "LabCohort", "PublicCohort"]


class PublicCohort:
    """``n`` phantom cases on a ``(X, Y, Z)`` grid, from :data:`PUBLIC_SEED` (generated on first use).

    Args:
        shape: the federation's volume shape (``Sample.volume_shape``).
        n: number of cases (8-32 is plenty for a prior; more trains a better learned inversion).
        seed: cohort seed; keep the default so no case coincides with a federation's phantom.
    """

    def __init__(self, shape: Sequence[int], n: int = 16, *, seed: int = PUBLIC_SEED) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.shape = tuple(int(s) for s in shape)
        self.n, self.seed = n, seed

    @cached_property
    def volumes(self) -> tuple[np.ndarray, np.ndarray]:
        """``images (N, 4, X, Y, Z)`` in canonical modality order, ``regions (N, 3, X, Y, Z)`` uint8 (TC, WT, ET)."""
        from splitunet.data.mni import MniAnatomy
        from splitunet.data.phantom import Orientation, make_case, output_spacing

        anatomy = MniAnatomy.load(output_spacing(self.shape))
        images, wt = [], []
        for index in range(self.n):
            case = make_case((self.seed, index), self.shape, anatomy=anatomy, orientation=Orientation.RAS)
            array = np.ascontiguousarray(np.stack([case.images[m] for m in MODALITIES]).astype(np.float32))
            images.append(normalize_nonzero(array))
            wt.append(labels_to_regions(case.label, case.et_label))
        return np.stack(images), np.stack(wt)

    def images(self, samples: Sequence[Sample], modalities: Sequence[str]) -> np.ndarray:
        """Every public case cut like each sample: ``(N, B, C, *size)``."""
        channels = [MODALITIES.index(m) for m in modalities]
        volumes, _ = self.volumes
        return np.stack([
            np.stack([extract(volumes[i][channels], _unbound(s)) for s in samples]) for i in range(self.n)
        ])

    def prior(self, samples: Sequence[Sample], modalities: Sequence[str]) -> np.ndarray:
        """The cohort's mean image cut like each sample: ``(B, C, *size)``."""
        return self.images(samples, modalities).mean(0)

    def training_images(self, samples: Sequence[Sample], modalities: Sequence[str]) -> np.ndarray:
        """Auxiliary training images for a learned inversion: ``(N * B, C, *size)``."""
        images = self.images(samples, modalities)
        return images.reshape(-1, *images.shape[2:])

    def regions(self, samples: Sequence[Sample]) -> np.ndarray:
        """Region channels (TC, WT, ET) of every public case cut like each sample: ``(N, B, 3, *size)``."""
        _, regions = self.volumes
        return np.stack([
            np.stack([extract(regions[i], _unbound(s), interpolation="nearest") for s in samples])
            for i in range(self.n)
        ])

    def masks(self, samples: Sequence[Sample]) -> np.ndarray:
        """Whole-tumour masks of every public case cut like each sample: ``(N, B, 1, *size)``."""
        return self.regions(samples)[:, :, 1:2]

    def crops(self, template: Sample, modality: str, cases: Sequence[int], per_case: int, *,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Random crops of ``template``'s geometry (2D axial slice or 3D crop, size, resize) from ``cases``.

        Two in three are centred on a random tumour voxel (jittered by a quarter of the size), the rest lie
        anywhere on the grid; flips are random. Returns images ``(N, 1, *size)`` of ``modality`` and WT masks
        ``(N, 1, *size)`` float32, ``N = len(cases) * per_case`` (a segmenter's training or validation set).
        """
        if per_case < 1 or not cases or any(not 0 <= c < self.n for c in cases):
            raise ValueError(f"need per_case >= 1 and case indices in [0, {self.n}), got {per_case}, {list(cases)}")
        rng = np.random.default_rng(seed)
        volumes, regions = self.volumes
        channel = MODALITIES.index(modality)
        dims, size = template.spatial_dims, np.array(template.size)
        grid = np.array(self.shape[:dims])
        images, masks = [], []
        for case in cases:
            tumour = np.argwhere(regions[case, 1] > 0)
            for k in range(per_case):
                if len(tumour) and k % 3 != 2:
                    centre = tumour[rng.integers(len(tumour))]
                    start = centre[:dims] - size // 2 + rng.integers(-(size // 4), size // 4 + 1)
                    z = int(centre[2])
                else:
                    start = rng.integers(np.minimum(0, grid - size), np.maximum(0, grid - size) + 1)
                    z = int(rng.integers(self.shape[2] // 4, 3 * self.shape[2] // 4))
                flips = tuple(int(a) for a in range(dims) if rng.random() < 0.5)
                sample = template.model_copy(update={
                    "case_id": f"public-{case}", "start": tuple(int(s) for s in start), "flip_axes": flips,
                    "axial_index": z if dims == 2 else None})
                images.append(extract(volumes[case][channel:channel + 1], sample))
                masks.append(extract(regions[case][1:2], sample, interpolation="nearest"))
        return np.stack(images).astype(np.float32), np.stack(masks).astype(np.float32)


def _unbound(sample: Sample) -> Sample:
    """The sample's geometry for another case of the same grid."""
    return sample.model_copy(update={"case_id": "public"})


class LabCohort:
    """The federation's cohort read directly (lab mode: phantom or test data; never in a real federation).

    Args:
        images_dir: a BraTS-layout folder with the images (every modality the audit scores).
        labels_dir: a folder with the segmentations (default: ``images_dir``).
    """

    def __init__(self, images_dir: Path | str, labels_dir: Path | str | None = None) -> None:
        self.images_dir = Path(images_dir)
        self.labels_dir = Path(labels_dir) if labels_dir is not None else self.images_dir
        if not self.images_dir.is_dir():
            raise DataError(f"lab cohort folder {str(self.images_dir)!r} does not exist")

    @cached_property
    def _cases(self) -> dict:
        return discover_cases(self.images_dir)

    @cached_property
    def _label_cases(self) -> dict:
        return discover_cases(self.labels_dir, require=("seg",))

    def images(self, samples: Sequence[Sample], modalities: Sequence[str]) -> np.ndarray:
        """The originals the site encoded: ``(B, C, *size)``."""
        out = []
        for s in samples:
            case = self._cases.get(s.case_id)
            if case is None:
                raise DataError(f"the lab cohort {str(self.images_dir)!r} has no case {s.case_id!r}")
            out.append(extract(load_images(case, tuple(modalities)).array, s))
        return np.stack(out)

    def masks(self, samples: Sequence[Sample]) -> np.ndarray:
        """Whole-tumour masks ``(B, 1, *size)``."""
        out = []
        for s in samples:
            case = self._label_cases.get(s.case_id)
            if case is None:
                raise DataError(f"the lab cohort {str(self.labels_dir)!r} has no segmentation of {s.case_id!r}")
            out.append(extract(load_regions(case)[1:2], s, interpolation="nearest"))
        return np.stack(out)

    def case_ids(self) -> list[str]:
        return sorted(self._cases)
