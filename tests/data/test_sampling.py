"""Samples: validation, extraction (crop, pad, flip, 2D), and the planners."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from splitunet.data.sampling import (
    Sample,
    extract,
    foreground_mask,
    plan_patches,
    plan_slices,
    slices_with_foreground,
)
from splitunet.errors import DataError

SHAPE = (20, 18, 12)


def _coords_volume(channels: int = 2) -> np.ndarray:
    """``(C, X, Y, Z)`` whose voxel value encodes its own (x, y, z) (1-based, so 0 means padding)."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    code = (x + 1) * 10000 + (y + 1) * 100 + (z + 1)
    return np.stack([code + 1_000_000 * c for c in range(channels)]).astype(np.int64)


# --------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": (0, 0), "size": (4, 4, 4)}, "3D"),
        ({"start": (0, 0, 0), "size": (4, 4, 4), "axial_index": 3}, "2D"),
        ({"start": (0, 0, 0), "size": (4, 0, 4)}, "size entries"),
        ({"start": (0, 0, 0), "size": (4, 4, 2000)}, "size entries"),
        ({"start": (0, 0, 99999), "size": (4, 4, 4)}, "start entries"),
        ({"start": (0, 0, 0), "size": (4, 4, 4), "flip_axes": (3,)}, "flip_axes"),
        ({"start": (0, 0, 0), "size": (4, 4, 4), "flip_axes": (1, 1)}, "flip_axes"),
        ({"start": (0, 0), "size": (4, 4), "axial_index": 2, "flip_axes": (2,)}, "flip_axes"),
        ({"start": (0, 0), "size": (4, 4), "axial_index": -1}, "axial_index"),
        ({"start": (0, 0), "size": (4, 4), "axial_index": 12, "volume_shape": SHAPE}, "outside volume_shape"),
        ({"start": (0, 0, 0), "size": (4, 4, 4), "volume_shape": (0, 4, 4)}, "volume_shape"),
        ({"start": (0, 0, 0), "size": (4, 4, 4), "spacing": 1}, "extra"),
        ({"case_id": "", "start": (0, 0, 0), "size": (4, 4, 4)}, "case_id"),
    ],
)
def test_sample_validation(kwargs, match) -> None:
    with pytest.raises(ValidationError, match=match):
        Sample(**{"case_id": "c", **kwargs})


def test_sample_json_round_trip() -> None:
    s = Sample(case_id="c", start=(-2, 0, 3), size=(8, 8, 8), flip_axes=(0, 2), volume_shape=SHAPE)
    assert Sample.model_validate_json(s.model_dump_json()) == s
    assert s.spatial_dims == 3
    s2 = Sample(case_id="c", start=(0, 1), size=(8, 8), axial_index=5)
    assert Sample.model_validate(s2.model_dump(mode="json")) == s2 and s2.spatial_dims == 2


# --------------------------------------------------------------------------------------------- extract
def test_extract_interior_crop_is_plain_slicing() -> None:
    vol = _coords_volume()
    s = Sample(case_id="c", start=(3, 2, 1), size=(8, 6, 4))
    out = extract(vol, s)
    np.testing.assert_array_equal(out, vol[:, 3:11, 2:8, 1:5])
    assert out.flags.c_contiguous and not np.shares_memory(out, vol)


def test_extract_pads_roi_larger_than_volume_with_zeros() -> None:
    vol = _coords_volume(1)
    s = plan_patches("c", SHAPE, (24, 18, 16), 1, np.random.default_rng(0))[0]
    assert s.start == (-2, 0, -2)
    out = extract(vol, s)
    assert out.shape == (1, 24, 18, 16)
    np.testing.assert_array_equal(out[:, 2:22, :, 2:14], vol)
    assert np.all(out[:, :2] == 0) and np.all(out[:, 22:] == 0) and np.all(out[..., :2] == 0)


def test_extract_partially_outside_and_fully_outside() -> None:
    vol = _coords_volume(1)
    out = extract(vol, Sample(case_id="c", start=(-3, 15, 10), size=(5, 5, 5)))
    np.testing.assert_array_equal(out[:, 3:, :3, :2], vol[:, 0:2, 15:18, 10:12])
    assert np.count_nonzero(out) == 2 * 3 * 2
    assert not extract(vol, Sample(case_id="c", start=(50, 0, 0), size=(4, 4, 4))).any()


def test_extract_flips_after_crop() -> None:
    vol = _coords_volume()
    s = Sample(case_id="c", start=(1, 2, 3), size=(6, 5, 4), flip_axes=(0, 2))
    np.testing.assert_array_equal(extract(vol, s), vol[:, 1:7, 2:7, 3:7][:, ::-1, :, ::-1])


def test_extract_2d_slice() -> None:
    vol = _coords_volume()
    s = Sample(case_id="c", start=(-2, 4), size=(24, 8), axial_index=7, flip_axes=(1,))
    out = extract(vol, s)
    assert out.shape == (2, 24, 8)
    expected = np.zeros((2, 24, 8), vol.dtype)
    expected[:, 2:22] = vol[:, :, 4:12, 7]
    np.testing.assert_array_equal(out, expected[:, :, ::-1])


def test_images_and_labels_stay_aligned() -> None:
    """The same sample on a site's images and the aggregator's labels picks the same voxels."""
    rng = np.random.default_rng(3)
    vol = _coords_volume(1)
    labels = vol[0] % 7  # any per-voxel function of position
    for s in plan_patches("c", SHAPE, (8, 8, 8), 20, rng, flip_prob=0.5):
        img = extract(vol, s)[0]
        lab = extract(labels[None], s)[0]
        np.testing.assert_array_equal(img % 7, lab)


def test_extract_refuses_other_grid_and_bad_slice() -> None:
    vol = _coords_volume(1)
    s = Sample(case_id="c", start=(0, 0, 0), size=(4, 4, 4), volume_shape=(20, 18, 13))
    with pytest.raises(DataError, match="grids disagree"):
        extract(vol, s)
    with pytest.raises(DataError, match="axial_index 12"):
        extract(vol, Sample(case_id="c", start=(0, 0), size=(4, 4), axial_index=12))
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        extract(vol[0], Sample(case_id="c", start=(0, 0, 0), size=(4, 4, 4)))


# --------------------------------------------------------------------------------------------- planners
def _tumour() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[15:18, 2:4, 9:11] = 2
    return lab


def test_plan_patches_uniform_in_bounds_and_deterministic() -> None:
    plans = plan_patches("c", SHAPE, (8, 8, 8), 200, np.random.default_rng(7))
    assert plans == plan_patches("c", SHAPE, (8, 8, 8), 200, np.random.default_rng(7))
    starts = np.array([p.start for p in plans])
    assert starts.min() == 0 and np.all(starts <= np.array(SHAPE) - 8)
    assert {p.start[0] for p in plans} == set(range(SHAPE[0] - 8 + 1))  # every start position reachable
    assert all(p.flip_axes == () and p.volume_shape == SHAPE for p in plans)
    whole = plan_patches("c", SHAPE, None, 1, np.random.default_rng(0))[0]
    assert whole.start == (0, 0, 0) and whole.size == SHAPE
    centred = plan_patches("c", SHAPE, (8, 8, 8), 3, np.random.default_rng(0), random_crop=False)
    assert {p.start for p in centred} == {(6, 5, 2)}


@pytest.mark.parametrize("fg", ["mask", "regions", "coords"])
def test_plan_patches_foreground_weighting(fg) -> None:
    lab = _tumour()
    foreground = {"mask": lab, "regions": np.stack([lab, lab, 0 * lab]), "coords": np.argwhere(lab)}[fg]
    plans = plan_patches("c", SHAPE, (6, 6, 6), 50, np.random.default_rng(0), foreground=foreground, fg_ratio=1.0)
    assert all(extract(lab[None], p).any() for p in plans)
    uniform = plan_patches("c", SHAPE, (6, 6, 6), 200, np.random.default_rng(0))
    hit = np.mean([extract(lab[None], p).any() for p in uniform])
    assert hit < 0.5  # without weighting most crops miss the small corner tumour
    # no foreground at all: falls back to uniform crops instead of failing
    empty = plan_patches("c", SHAPE, (6, 6, 6), 5, np.random.default_rng(0), foreground=0 * lab, fg_ratio=1.0)
    assert len(empty) == 5


def test_plan_flips() -> None:
    always = plan_patches("c", SHAPE, (8, 8, 8), 10, np.random.default_rng(0), flip_prob=1.0, flip_axes=(0, 2))
    assert {p.flip_axes for p in always} == {(0, 2)}
    some = plan_patches("c", SHAPE, (8, 8, 8), 200, np.random.default_rng(0), flip_prob=0.5)
    counts = np.array([[a in p.flip_axes for a in range(3)] for p in some]).mean(axis=0)
    assert np.all((counts > 0.35) & (counts < 0.65))


def test_plan_slices() -> None:
    lab = _tumour()
    brain = np.zeros((1, *SHAPE), np.float32)
    brain[0, 4:16, 4:14, 3:9] = 1.0
    allowed = slices_with_foreground(brain)
    np.testing.assert_array_equal(allowed, np.arange(3, 9))
    plans = plan_slices("c", SHAPE, (16, 16), 100, np.random.default_rng(1), allowed_slices=allowed)
    assert {p.axial_index for p in plans} <= set(range(3, 9)) and len({p.axial_index for p in plans}) > 3
    assert all(p.size == (16, 16) and p.spatial_dims == 2 for p in plans)
    tum = plan_slices("c", SHAPE, (8, 8), 30, np.random.default_rng(1), foreground=lab, fg_ratio=1.0)
    assert {p.axial_index for p in tum} <= {9, 10}
    assert all(extract(lab[None], p).any() for p in tum)
    full = plan_slices("c", SHAPE, None, 1, np.random.default_rng(1), flip_prob=1.0)[0]
    assert full.size == SHAPE[:2] and full.start == (0, 0) and full.flip_axes == (0, 1)
    padded = plan_slices("c", SHAPE, (24, 24), 1, np.random.default_rng(1))[0]
    assert padded.start == (-2, -3)
    with pytest.raises(ValueError, match="allowed_slices"):
        plan_slices("c", SHAPE, None, 1, np.random.default_rng(1), allowed_slices=[12])


def test_foreground_helpers() -> None:
    lab = _tumour()
    assert foreground_mask(np.stack([lab, 0 * lab])).sum() == np.count_nonzero(lab)
    with pytest.raises(ValueError, match="volume must be"):
        foreground_mask(lab[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"roi": (8, 8)}, "roi must be 3"),
        ({"n": 0}, "n "),
        ({"fg_ratio": 1.5}, "fg_ratio"),
        ({"fg_ratio": 0.5}, "needs foreground"),
        ({"flip_prob": -0.1}, "flip_prob"),
        ({"flip_axes": (3,)}, "flip_axes"),
        ({"shape": (4, 4)}, "shape"),
        ({"rng": 3}, "rng must be"),
    ],
)
def test_plan_patches_bad_arguments(kwargs, match) -> None:
    args = {"shape": SHAPE, "roi": (8, 8, 8), "n": 1, "rng": np.random.default_rng(0)} | kwargs
    extra = {k: v for k, v in args.items() if k in ("fg_ratio", "flip_prob", "flip_axes")}
    with pytest.raises(ValueError, match=match):
        plan_patches("c", args["shape"], args["roi"], args["n"], args["rng"], **extra)


def test_resized_slices_keep_images_and_labels_aligned():
    from splitunet.data.sampling import plan_slices

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(48), np.arange(40), indexing="ij")
    square = ((x >= 12) & (x < 36) & (y >= 8) & (y < 32)).astype(np.float32)
    volume = np.stack([square] * 3, axis=-1)[None]  # (1, 48, 40, 3)
    labels = volume.astype(np.uint8)
    samples = plan_slices("c", (48, 40, 3), (24, 20), 6, rng, resize=True, flip_prob=0.5)
    for sample in samples:
        assert sample.size == (48, 40) and sample.resize == (24, 20) and sample.output_size == (24, 20)
        image = extract(volume, sample)
        label = extract(labels, sample, interpolation="nearest")
        assert image.shape == label.shape == (1, 24, 20) and label.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1}
        # the half-size label square: 12 x 12 voxels, where the resized image is bright
        assert label.sum() == 144
        assert image[label == 1].min() > 0.5 and image[label == 0].max() < 0.5
    with pytest.raises(ValueError, match="resize is for 2D"):
        Sample(case_id="c", start=(0, 0, 0), size=(4, 4, 4), resize=(2, 2))
