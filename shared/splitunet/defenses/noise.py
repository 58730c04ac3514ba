"""Calibrated additive noise on outbound activations: Gaussian (as NVFlare's ``GaussianPrivacy``) and Laplace.

The noise scale is relative to the tensor itself: ``sigma = sigma0 * P95(|F|)`` per named tensor (the 95th
percentile of its absolute values over the whole batch), so one ``sigma0`` suits every level of the U-Net.
Gradients pass straight through (additive noise: exact).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from splitunet.defenses.base import NoiseSource, Stats, abs_percentile
from splitunet.defenses.config import GaussianConfig, LaplaceConfig
from splitunet.filters import FilterContext

logger = logging.getLogger(__name__)


class GaussianNoise:
    """``F + N(0, sigma^2)`` with ``sigma = sigma0 * P95(|F|)`` per tensor."""

    name = "gaussian"

    def __init__(self, config: GaussianConfig) -> None:
        self.config = config
        self.noise = NoiseSource(config.seed)
        self._stats = Stats(calls=0.0, noise_std=0.0)

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        out, stds = {}, []
        for name, t in tensors.items():
            sigma = self.config.sigma0 * abs_percentile(t)
            out[name] = t + self.noise.gaussian(t, sigma).to(t.dtype)
            stds.append(sigma)
        self._stats.add(calls=1)
        self._stats.update(noise_std=max(stds))
        logger.debug("%s step %d: gaussian noise std up to %.4g", context.site, context.step, max(stds))
        return out

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "sigma0": self.config.sigma0, "calibration": "sigma = sigma0 * P95(|F|)"}

    def stats(self) -> dict[str, float]:
        return self._stats.snapshot()


class LaplaceNoise:
    """``F + Laplace(0, b)`` with ``b = b0 * P95(|F|)`` per tensor (standard deviation ``sqrt(2) * b``)."""

    name = "laplace"

    def __init__(self, config: LaplaceConfig) -> None:
        self.config = config
        self.noise = NoiseSource(config.seed)
        self._stats = Stats(calls=0.0, noise_scale=0.0)

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        out, scales = {}, []
        for name, t in tensors.items():
            scale = self.config.b0 * abs_percentile(t)
            out[name] = t + self.noise.laplace(t, scale).to(t.dtype)
            scales.append(scale)
        self._stats.add(calls=1)
        self._stats.update(noise_scale=max(scales))
        return out

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "b0": self.config.b0, "calibration": "b = b0 * P95(|F|)"}

    def stats(self) -> dict[str, float]:
        return self._stats.snapshot()
