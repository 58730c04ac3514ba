"""Whole-volume prediction with sliding windows, when the images are at hand (in-process evaluation, baselines).

The REST services predict the same way without the images at the aggregator
(``services/aggregator/evaluation.py``: the windows are cut by the sites); both use MONAI's
``sliding_window_inference`` with Gaussian blending and :data:`DEFAULT_OVERLAP`, so the in-process figures and the
services' validation are computed on the same terms.

- 3D: windows of ``roi`` over the ``(X, Y, Z)`` volume.
- 2D: every axial slice is one item of a batch ``(Z, C, X, Y)``; windows of ``roi`` in-plane.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

#: Sliding-window overlap (MONAI's BraTS tutorial setting).
DEFAULT_OVERLAP = 0.5


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
    """Logits ``(3, X, Y, Z)`` float32 of a whole ``(C, X, Y, Z)`` volume.

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
    inputs = images[None] if len(roi_t) == 3 else images.permute(3, 0, 1, 2)  # (1, C, X, Y, Z) or (Z, C, X, Y)
    with torch.no_grad():
        logits = sliding_window_inference(
            inputs.float(), roi_size=roi_t, sw_batch_size=batch_size, predictor=predict, overlap=overlap,
            mode="gaussian",
        )
    logits = torch.as_tensor(logits).float()
    return logits[0] if len(roi_t) == 3 else logits.permute(1, 2, 3, 0).contiguous()
