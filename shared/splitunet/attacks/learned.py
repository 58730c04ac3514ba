"""Learned inversion: a decoder from activations to images, trained on an auxiliary public cohort.

The attacker encodes auxiliary images (phantom cases disjoint from the federation) through a *shadow encoder* (a
weight snapshot the site granted, or UnSplit's clone), and trains a small convolutional decoder to map the
activations back to the images (MSE). Inversion is then one forward pass (amortised), in 2D or 3D.

The decoder upsamples every received tensor ``level{i}`` (``B, C_i, *spatial / 2**i``) to full resolution with
a transposed convolution, concatenates them and refines with three convolutions to ``B, C_site, *spatial``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from monai.networks.layers.factories import Act, Conv
from torch import nn

from splitunet.attacks.base import AttackKind, Observation, Target
from splitunet.config import SplitUNetConfig

logger = logging.getLogger(__name__)


class InversionDecoder(nn.Module):
    """Activations ``{level{i}: B, features[i], *spatial/2**i}`` -> images ``B, C_site, *spatial``."""

    def __init__(self, config: SplitUNetConfig, site: str, width: int = 32) -> None:
        super().__init__()
        dims = config.spatial_dims
        self.levels = tuple(config.sent_levels)
        self.up = nn.ModuleDict()
        for level in self.levels:
            c = config.features[level]
            self.up[f"level{level}"] = (
                Conv["conv", dims](c, width, kernel_size=3, padding=1) if level == 0
                else Conv["convtrans", dims](c, width, kernel_size=2**level, stride=2**level)
            )
        act = Act["leakyrelu"]
        self.head = nn.Sequential(
            Conv["conv", dims](width * len(self.levels), width, kernel_size=3, padding=1), act(0.1),
            Conv["conv", dims](width, width, kernel_size=3, padding=1), act(0.1),
            Conv["conv", dims](width, config.site(site).in_channels, kernel_size=3, padding=1),
        )

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([self.up[name](tensors[name]) for name in self.up], dim=1))


class LearnedInversion:
    """Args:
        steps: Adam steps of decoder training; batch_size: auxiliary images per step; lr: Adam learning rate.
        width: decoder channels; seed: the attacker's initialisation and batch order.
        noise_sigma0: train on activations with the site's calibrated noise (``sigma0 * P95(|F|)``) when known.
    """

    kind = AttackKind.LEARNED
    target = Target.IMAGES

    def __init__(self, *, steps: int = 300, batch_size: int = 8, lr: float = 2e-3, width: int = 32,
                 seed: int = 0, noise_sigma0: float = 0.0) -> None:
        if steps < 1 or batch_size < 1 or lr <= 0 or width < 1 or noise_sigma0 < 0:
            raise ValueError("steps, batch_size, width must be >= 1, lr > 0, noise_sigma0 >= 0")
        self.steps, self.batch_size, self.lr, self.width, self.seed = steps, batch_size, lr, width, seed
        self.noise_sigma0 = noise_sigma0
        self.decoder: InversionDecoder | None = None
        self.final_loss: float | None = None

    def fit(self, shadow: nn.Module, config: SplitUNetConfig, site: str, aux_images: torch.Tensor) -> LearnedInversion:
        """Train the decoder on ``aux_images`` (``N, C_site, *spatial``, the public cohort) through ``shadow``."""
        if aux_images.ndim != config.spatial_dims + 2 or aux_images.shape[0] < 1:
            raise ValueError(f"aux_images must be N, C_site, *spatial; got {tuple(aux_images.shape)}")
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            decoder = InversionDecoder(config, site, self.width)
        shadow.eval()
        with torch.no_grad():
            features = shadow(aux_images.float())
        optimizer = torch.optim.Adam(decoder.parameters(), lr=self.lr)
        n = aux_images.shape[0]
        for _ in range(self.steps):
            idx = torch.randint(0, n, (min(self.batch_size, n),), generator=generator)
            batch = {k: v[idx] for k, v in features.items()}
            if self.noise_sigma0:
                batch = {k: v + self.noise_sigma0 * torch.quantile(v.abs().flatten(), 0.95)
                         * torch.randn(v.shape, generator=generator) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            loss = ((decoder(batch) - aux_images[idx]) ** 2).mean()
            loss.backward()
            optimizer.step()
        self.final_loss = loss.item()
        logger.info("learned inversion of site %s: decoder trained, final MSE %.4f", site, self.final_loss)
        self.decoder = decoder.eval().requires_grad_(False)
        return self

    def __call__(self, observation: Observation) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError("LearnedInversion must be fit() on an auxiliary cohort before it attacks")
        with torch.no_grad():
            return self.decoder({k: v.float() for k, v in observation.activations.items()})
