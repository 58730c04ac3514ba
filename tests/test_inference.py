"""Whole-volume prediction: no tumour outside the brain's axial extent, and in 2D those slices are not computed."""

from __future__ import annotations

import pytest
import torch

from splitunet.inference import BACKGROUND_LOGIT, axial_range, predict_volume


def _volume(shape=(2, 16, 16, 10), brain=(3, 6)) -> torch.Tensor:
    images = torch.zeros(shape)
    images[1, 4:12, 4:12, brain[0]:brain[1] + 1] = 1.0  # one modality's brain on slices 3..6
    return images


def test_2d_predicts_only_the_brains_slices_and_background_elsewhere() -> None:
    seen: list[torch.Tensor] = []

    def predict(batch: torch.Tensor) -> torch.Tensor:  # (Z, C, X, Y) -> (Z, 3, X, Y): "tumour" everywhere
        seen.append(batch.clone())
        return torch.full((batch.shape[0], 3, *batch.shape[2:]), 5.0)

    logits = predict_volume(predict, _volume(), (8, 8), batch_size=64)
    assert logits.shape == (3, 16, 16, 10)
    assert torch.allclose(logits[..., 3:7], torch.tensor(5.0))
    assert (logits[..., :3] == BACKGROUND_LOGIT).all() and (logits[..., 7:] == BACKGROUND_LOGIT).all()
    assert torch.sigmoid(logits[..., :3]).max() == 0.0
    # only the 4 brain slices went to the model (each window of every slice in one batch)
    assert sum(b.shape[0] for b in seen) == 4 * 9  # 3 x 3 windows of 8 at overlap 0.5 over 16 x 16
    assert all(b[:, 1].sum() > 0 for b in seen), "an empty slice was predicted"


def test_3d_sets_the_slices_outside_the_brain_to_background() -> None:
    def predict(batch: torch.Tensor) -> torch.Tensor:
        return torch.full((batch.shape[0], 3, *batch.shape[2:]), 5.0)

    logits = predict_volume(predict, _volume(), (8, 8, 8), batch_size=4)
    assert torch.allclose(logits[..., 3:7], torch.tensor(5.0))
    assert (logits[..., :3] == BACKGROUND_LOGIT).all() and (logits[..., 7:] == BACKGROUND_LOGIT).all()


@pytest.mark.parametrize(("extent", "depth", "want"), [
    (None, 10, (0, 10)),  # unknown: every slice
    ((3, 6), 10, (3, 7)),
    ((0, 99), 10, (0, 10)),  # clipped to the volume
])
def test_axial_range(extent, depth, want) -> None:
    assert axial_range(extent, depth) == want


def test_an_all_zero_volume_is_predicted_everywhere_as_unknown() -> None:
    """Without any nonzero voxel the extent is unknown (``axial_extent`` gives None), as for the 2D planner."""
    logits = predict_volume(lambda b: torch.ones(b.shape[0], 3, *b.shape[2:]), torch.zeros(1, 8, 8, 4), (8, 8))
    assert (logits == 1.0).all()
