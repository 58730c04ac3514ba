"""Tiny synthetic multi-modal volumes for fast in-process training and tests.

Not anatomy (that is :mod:`splitunet.data.phantom`): a blurred-noise "brain" ellipsoid with a nested tumour
(core inside edema, an enhancing rim) whose contrast differs per modality, so each modality carries different
information about the regions, as in BraTS.
"""

from __future__ import annotations

import torch

from splitunet.config import MODALITIES


def synthetic_batch(
    batch_size: int, roi: tuple[int, ...], *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``images`` ``B, 4, *roi`` (t1, t1ce, t2, flair; zero-mean unit-variance-ish float32) and ``regions``
    ``B, 3, *roi`` (TC, WT, ET as float 0/1)."""
    if batch_size < 1 or any(r < 8 for r in roi) or len(roi) not in (2, 3):
        raise ValueError(f"batch_size >= 1 and 2 or 3 sizes >= 8 are required, got {batch_size}, {roi}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, r) for r in roi], indexing="ij")
    images, regions = [], []
    for _ in range(batch_size):
        centre = [(torch.rand(1, generator=g).item() - 0.5) * 0.8 for _ in roi]
        radius = 0.15 + 0.25 * torch.rand(1, generator=g).item()
        dist = torch.sqrt(sum(((a - c) / radius) ** 2 for a, c in zip(axes, centre)))
        brain = (torch.sqrt(sum((a / 0.95) ** 2 for a in axes)) < 1).float()
        wt = (dist < 1.0).float() * brain
        tc = (dist < 0.6).float() * brain
        et = ((dist < 0.6) & (dist > 0.4)).float() * brain
        necrosis = tc - et
        edema = wt - tc
        contrast = {  # (edema, enhancing, necrosis) intensity offsets per modality
            "t1": (-0.3, -0.2, -0.8),
            "t1ce": (-0.2, 1.5, -0.8),
            "t2": (1.0, 0.5, 1.2),
            "flair": (1.5, 0.6, 0.3),
        }
        chans = []
        for m in MODALITIES:
            e, en, n = contrast[m]
            noise = 0.3 * torch.randn(roi, generator=g)
            chans.append(brain * (1.0 + e * edema + en * et + n * necrosis + noise))
        images.append(torch.stack(chans))
        regions.append(torch.stack([tc, wt, et]))
    return torch.stack(images), torch.stack(regions)
