"""Label protection on the gradients the aggregator returns: per-sample norm equalisation and spatial smoothing.

A curious site reads tumour shape from the per-voxel magnitude of the gradient map it receives, and which
samples hold tumour from per-sample gradient norms (the "norm attack"). Two filters blunt this (DP clipping and
noise of the gradients is :class:`~splitunet.defenses.dp.DPGaussian` with the same configuration as at a site):

- ``norm_equalize``: per site (the chain runs on each site's gradient bundle separately), every sample's gradient
  (jointly over the bundle's tensors) is rescaled to the batch's mean per-sample norm for that site; the update's
  overall size is kept, the ranking of samples by norm is gone.
- ``smooth``: each gradient map is smoothed over its spatial axes by MONAI's ``GaussianFilter`` with ``sigma``
  voxels (of that tensor's grid), blurring the tumour outline. Measured against the audit's label-leakage
  attack it does not protect: it denoises the gradient map and the recovered mask gets *better*
  (docs/results/attacks.md); combine it with ``dp`` or gradient noise, which do reduce the leak.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.networks.layers import GaussianFilter

from splitunet.defenses.base import Stats, per_sample_sq_norms, scale_samples
from splitunet.defenses.config import NormEqualizeConfig, SmoothConfig
from splitunet.filters import FilterContext


class NormEqualize:
    name = "norm_equalize"

    def __init__(self, config: NormEqualizeConfig) -> None:
        self.config = config
        self._stats = Stats(calls=0.0, target_norm=0.0, norm_spread=0.0)

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        norms = per_sample_sq_norms(tensors).sqrt()
        target = norms.mean()
        factors = torch.where(norms > 0, target / norms.clamp_min(1e-30), torch.zeros_like(norms))
        self._stats.add(calls=1)
        spread = float(norms.max() / norms.min()) if float(norms.min()) > 0 else float("inf")
        self._stats.update(target_norm=float(target), norm_spread=spread)
        return scale_samples(tensors, factors)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "target": "mean per-sample norm of the batch"}

    def stats(self) -> dict[str, float]:
        return self._stats.snapshot()


class Smooth:
    name = "smooth"

    def __init__(self, config: SmoothConfig) -> None:
        self.config = config
        self._filters: dict[int, GaussianFilter] = {}
        self._stats = Stats(calls=0.0)

    def _filter(self, spatial_dims: int) -> GaussianFilter:
        if spatial_dims not in self._filters:
            self._filters[spatial_dims] = GaussianFilter(spatial_dims, sigma=self.config.sigma)
        return self._filters[spatial_dims]

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            with torch.no_grad():
                out[name] = self._filter(t.ndim - 2).to(t.device)(t.float()).to(t.dtype)
        self._stats.add(calls=1)
        return out

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "sigma_voxels": self.config.sigma}

    def stats(self) -> dict[str, float]:
        return self._stats.snapshot()
