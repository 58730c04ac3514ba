"""The frozen whole-tumour segmenter behind *semantic leakage*, trained by the audit on its public cohort.

Semantic leakage (methods, section 5) asks whether a reconstruction still shows the tumour: the Dice between a
frozen segmenter's whole-tumour (WT) mask on the reconstruction ``x_hat`` and its mask on the original ``x``
(:func:`splitunet.leakage.semantic_leakage`). No weights are downloaded: the audit trains the segmenter itself,
briefly and with fixed seeds, on the public auxiliary phantom cohort
(:class:`~splitunet.auditing.cohorts.PublicCohort`, disjoint from the federation), one per modality and sample
geometry (2D slice or 3D crop of the recorded samples' size), once per audit; a quarter of the public cases are
held out and its validation Dice against their true WT masks is reported with the audit.

Architecture ``wt-unet/1`` (fixed): MONAI ``UNet`` with one input channel (one modality, the sites'
preprocessing), one output channel (WT logit), channels 8-16-32, strides 2-2, instance norm without affine
parameters, PReLU. Inputs ``(H, W[, D])`` are zero-padded up to a multiple of 4 per axis and the mask is cropped
back; a voxel is tumour where the logit is > 0.

Where the originals are: each site's own audit trains and runs the segmenter on its own premises
(:mod:`splitunet.auditing.site_local`); only the Dice leaves the site.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitunet.leakage import dice, semantic_leakage

if TYPE_CHECKING:
    from splitunet.auditing.cohorts import PublicCohort
    from splitunet.data.sampling import Sample

logger = logging.getLogger(__name__)

#: The architecture identifier.
ARCHITECTURE = "wt-unet/1"
_CHANNELS = (8, 16, 32)
_STRIDES = (2, 2)
_MULTIPLE = 4  # product of the strides


def build_network(spatial_dims: int) -> nn.Module:
    """The ``wt-unet/1`` network (untrained) for ``spatial_dims`` 2 or 3: ``B, 1, *spatial -> B, 1, *spatial``."""
    from monai.networks.nets import UNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=_CHANNELS, strides=_STRIDES,
                num_res_units=0, norm="INSTANCE", act="PRELU")


def _pad(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of ``B, C, *spatial`` to multiples of 4; also return the original size."""
    size = tuple(int(s) for s in x.shape[2:])
    pads: list[int] = []
    for s in reversed(size):
        pads += [0, (-s) % _MULTIPLE]
    return (F.pad(x, pads) if any(pads) else x), size


class WTSegmenter:
    """A frozen ``wt-unet/1``: ``segmenter(image (H, W[, D])) -> bool WT mask`` of the same shape.

    Args:
        network: a :func:`build_network` module with its weights (put in eval mode, gradients off).
        spatial_dims: 2 or 3.
        modality: the modality it segments (informative).
        validation_dice: mean WT Dice on held-out public crops, when known.
    """

    def __init__(self, network: nn.Module, spatial_dims: int, *, modality: str = "",
                 validation_dice: float | None = None) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.network = network.eval().requires_grad_(False)
        self.spatial_dims, self.modality, self.validation_dice = spatial_dims, modality, validation_dice

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """WT logits of ``B, 1, *spatial`` float images (any spatial size)."""
        padded, size = _pad(images.float())
        out = self.network(padded)
        return out[(slice(None), slice(None), *(slice(0, s) for s in size))]

    def segment(self, images: np.ndarray) -> np.ndarray:
        """Bool WT masks of a batch ``(N, *spatial)``."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim != self.spatial_dims + 1:
            raise ValueError(f"expected a batch (N, *spatial) of {self.spatial_dims}D images, got shape {x.shape}")
        with torch.no_grad():
            return (self.logits(torch.from_numpy(np.ascontiguousarray(x))[:, None]) > 0)[:, 0].numpy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != self.spatial_dims:
            raise ValueError(f"expected one {self.spatial_dims}D image, got shape {image.shape}")
        return self.segment(image[None])[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().contiguous() for k, v in self.network.state_dict().items()}


def train_segmenter(images: np.ndarray, masks: np.ndarray, *, steps: int = 200, batch_size: int = 8,
                    lr: float = 5e-3, seed: int = 0, modality: str = "") -> WTSegmenter:
    """Train ``wt-unet/1`` on ``images (N, 1, *spatial)`` float32 and WT ``masks (N, 1, *spatial)`` in {0, 1}.

    Adam on MONAI's ``DiceCELoss`` (sigmoid), ``steps`` batches drawn with ``seed`` (initialisation too), so the
    same data gives the same segmenter.
    """
    from monai.losses import DiceCELoss

    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    if images.shape != masks.shape or images.ndim not in (4, 5) or images.shape[1] != 1 or not len(images):
        raise ValueError(f"images and masks must both be (N, 1, *spatial) with N >= 1, got {images.shape} and "
                         f"{masks.shape}")
    spatial_dims = images.ndim - 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(spatial_dims)
    generator = torch.Generator().manual_seed(seed)
    x, y = _pad(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))[0], _pad(
        torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)))[0]
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-4, smooth_dr=1e-4)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
    logger.info("WT segmenter (%s, %dD): %d steps on %d public crops, final loss %.3f", modality or "?",
                spatial_dims, steps, len(x), loss.item())
    return WTSegmenter(network, spatial_dims, modality=modality)


def train_public_segmenter(public: PublicCohort, template: Sample, modality: str, *, steps: int = 200,
                           per_case: int = 8, seed: int = 0) -> WTSegmenter:
    """The audit's segmenter of ``modality`` for samples shaped like ``template``, from the public cohort.

    Trains on random crops (:meth:`PublicCohort.crops`) of all but the last quarter of the public cases and sets
    ``validation_dice`` on crops of those held-out cases.
    """
    if public.n < 2:
        raise ValueError(f"the public cohort needs >= 2 cases (training and held-out), has {public.n}")
    held = max(1, public.n // 4)
    images, masks = public.crops(template, modality, range(public.n - held), per_case, seed=seed)
    segmenter = train_segmenter(images, masks, steps=steps, seed=seed, modality=modality)
    val_images, val_masks = public.crops(template, modality, range(public.n - held, public.n), per_case,
                                         seed=seed + 1)
    segmenter.validation_dice = mean_dice(segmenter, val_images, val_masks)
    logger.info("WT segmenter (%s): Dice %s on %d held-out public crops", modality, segmenter.validation_dice,
                len(val_images))
    return segmenter


def mean_dice(segmenter: WTSegmenter, images: np.ndarray, masks: np.ndarray) -> float | None:
    """Mean WT Dice of ``segmenter`` on ``images (N, 1, *spatial)`` against ``masks``, over crops with tumour."""
    predicted = segmenter.segment(images[:, 0])
    truth = np.asarray(masks[:, 0]) > 0
    values = [dice(p, t) for p, t in zip(predicted, truth, strict=True) if t.any()]
    return float(np.mean(values)) if values else None


def semantic_score(segmenter: WTSegmenter | None, recon: np.ndarray, original: np.ndarray) -> float | None:
    """:func:`~splitunet.leakage.semantic_leakage` of one image pair, or ``None`` without a segmenter or when the
    segmenter finds no tumour in the original (an empty mask on both would score a meaningless 1.0)."""
    if segmenter is None or not segmenter(original).any():
        return None
    return semantic_leakage(segmenter, recon, original)
