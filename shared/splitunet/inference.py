"""Whole-volume prediction with sliding windows, when the images are at hand (in-process evaluation, baselines).

The REST services predict the same way without the images at the aggregator
(``services/aggregator/evaluation.py``: the windows are cut by the sites); both use MONAI's
``sliding_window_inference`` with Gaussian blending and :data:`DEFAULT_OVERLAP`, so the in-process figures and the
services' validation are computed on the same terms.

- 3D: windows of ``roi`` over the ``(X, Y, Z)`` volume.
- 2D: every axial slice is one item of a batch ``(Z, C, X, Y)``; windows of ``roi`` in-plane.

Both predict "no tumour" outside the brain's axial extent (the slices where some modality has a nonzero voxel;
:func:`~splitunet.data.grid.axial_extent`, which the sites report as ``brain_z``): no tumour lies where no site
has an image, the 2D planner never trains on such slices, and a model shown an empty slice answers arbitrarily
(nnU-Net likewise predicts only inside the nonzero crop). In 2D those slices are not computed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

from splitunet.data.grid import axial_extent

#: Sliding-window overlap (MONAI's BraTS tutorial setting).
DEFAULT_OVERLAP = 0.5
#: The logit given to every region outside the brain's axial extent (its sigmoid is 0 in float32).
BACKGROUND_LOGIT = -1.0e4


def axial_range(extent: tuple[int, int] | None, depth: int) -> tuple[int, int]:
    """``[first, stop)`` of the axial slices to predict: the brain extent ``(first, last)`` clipped to the volume,
    or every slice when the extent is unknown (``None``)."""
    if extent is None:
        return 0, depth
    first, last = max(int(extent[0]), 0), min(int(extent[1]), depth - 1)
    return (first, last + 1) if first <= last else (0, 0)


def outside_brain(values: torch.Tensor, extent: tuple[int, int] | None, fill: float) -> torch.Tensor:
    """``values`` ``(3, X, Y, Z)`` with every slice outside the brain's axial extent set to ``fill`` (in place)."""
    first, stop = axial_range(extent, values.shape[-1])
    values[..., :first] = fill
    values[..., stop:] = fill
    return values


def check_overlap(overlap: float) -> float:
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return float(overlap)


def predict_volume(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    roi: Sequence[int],
    *,
    batch_size: int = 4,
    overlap: float = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """Logits ``(3, X, Y, Z)`` float32 of a whole ``(C, X, Y, Z)`` volume; :data:`BACKGROUND_LOGIT` outside the
    brain's axial extent (see the module's docstring).

    Args:
        predict: ``B, C, *roi -> B, 3, *roi`` logits (e.g. :meth:`~splitunet.training.InProcessFederation.predict`).
        roi: window: 3 sizes (3D) or 2 in-plane sizes (2D, slice by slice).
        batch_size: windows per call of ``predict``.
        overlap: window overlap fraction in ``[0, 1)``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (C, X, Y, Z), got shape {tuple(images.shape)}")
    roi_t = tuple(int(r) for r in roi)
    if len(roi_t) not in (2, 3):
        raise ValueError(f"roi must have 2 (2D) or 3 (3D) sizes, got {list(roi)}")
    overlap = check_overlap(overlap)
    extent = axial_extent(images.detach().cpu().numpy())
    if len(roi_t) == 3:
        with torch.no_grad():
            logits = sliding_window_inference(
                images[None].float(), roi_size=roi_t, sw_batch_size=batch_size, predictor=predict, overlap=overlap,
                mode="gaussian",
            )
        return outside_brain(torch.as_tensor(logits).float()[0], extent, BACKGROUND_LOGIT)
    first, stop = axial_range(extent, images.shape[-1])
    out = torch.full((3, *images.shape[1:]), BACKGROUND_LOGIT)
    if stop > first:
        inputs = images[..., first:stop].permute(3, 0, 1, 2)  # (Z, C, X, Y): the brain's slices only
        with torch.no_grad():
            logits = sliding_window_inference(
                inputs.float(), roi_size=roi_t, sw_batch_size=batch_size, predictor=predict, overlap=overlap,
                mode="gaussian",
            )
        out[..., first:stop] = torch.as_tensor(logits).float().permute(1, 2, 3, 0)
    return out
