"""FSHA, the feature-space hijacking attack (Pasquini, Ateniese, Bernaschi, CCS 2021): a malicious aggregator.

The aggregator does not train the task. It trains, on public data, a *shadow* encoder ``f~`` (the site encoder's
architecture, which is public in a federation) and an inverse ``f~^-1`` (an autoencoder), and a discriminator
``D`` that tells the shadow's features of public images from the site's features. The gradient it returns to the
site for the features ``z = f(x)`` it received is the one that fools ``D``: it pulls the site's feature space
into the shadow's, where ``f~^-1`` inverts it. Then ``x^ = f~^-1(z)`` recovers the site's images without its
weights. Every step of the aggregator (tensor layouts ``B, C, *spatial``)::

    autoencoder  min  || f~^-1(f~(x_pub)) - x_pub ||^2            over f~, f~^-1
    critic       min  softplus(-D(f~(x_pub))) + softplus(D(z))     over D     (z detached)
    to the site  dL/dz  with  L = softplus(-D(z))                   (the site backpropagates it into f)

The paper's critic is a Wasserstein GAN with gradient penalty; this one is the non-saturating GAN loss, which
trains as fast at this scale. The attacker's own measure of success is :meth:`FSHAServer.reconstruct`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv
from torch import nn

from splitunet.attacks.learned import InversionDecoder
from splitunet.config import SplitUNetConfig
from splitunet.networks.factory import make_site_encoder


class FeatureCritic(nn.Module):
    """``{level{i}: B, C_i, *spatial/2**i}`` -> one logit per sample (real: the shadow's features)."""

    def __init__(self, config: SplitUNetConfig, width: int = 32) -> None:
        super().__init__()
        dims = config.spatial_dims
        self.branches = nn.ModuleDict({
            f"level{level}": nn.Sequential(
                Conv["conv", dims](config.features[level], width, kernel_size=3, stride=2, padding=1),
                Act["leakyrelu"](0.2),
                Conv["conv", dims](width, width, kernel_size=3, stride=2, padding=1),
                Act["leakyrelu"](0.2),
            ) for level in config.sent_levels
        })
        self.head = nn.Linear(width * len(self.branches), 1)

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = [b(tensors[name]).flatten(2).mean(-1) for name, b in self.branches.items()]
        return self.head(torch.cat(pooled, dim=1)).squeeze(1)


class FSHAServer:
    """The hijacking aggregator of one site.

    Args:
        config: the federation's model configuration (public).
        site: the attacked site.
        public_images: ``N, C_site, *spatial`` auxiliary images (a public cohort disjoint from the site's).
        lr: Adam learning rate of the shadow, inverse and critic.
        batch_size: public images per step.
        seed: the attacker's initialisation and batch order.
    """

    def __init__(self, config: SplitUNetConfig, site: str, public_images: torch.Tensor, *, lr: float = 1e-3,
                 batch_size: int = 8, seed: int = 0) -> None:
        if public_images.ndim != config.spatial_dims + 2 or public_images.shape[0] < 1:
            raise ValueError(f"public_images must be N, C_site, *spatial; got {tuple(public_images.shape)}")
        if lr <= 0 or batch_size < 1:
            raise ValueError("lr must be > 0 and batch_size >= 1")
        self.config, self.site, self.public = config, site, public_images.float()
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.shadow = make_site_encoder(config, site, seed + 1)
            self.inverse = InversionDecoder(config, site)
            self.critic = FeatureCritic(config)
        self.autoencoder_opt = torch.optim.Adam([*self.shadow.parameters(), *self.inverse.parameters()], lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.5, 0.999))

    def _public_batch(self) -> torch.Tensor:
        idx = torch.randint(0, self.public.shape[0], (min(self.batch_size, self.public.shape[0]),),
                            generator=self.generator)
        return self.public[idx]

    def gradients(self, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One attacker step on the site's features ``received``; the gradients to send back (same names and
        shapes)."""
        x_pub = self._public_batch()
        self.shadow.train()
        self.autoencoder_opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.inverse(self.shadow(x_pub)), x_pub)
        loss.backward()
        self.autoencoder_opt.step()

        with torch.no_grad():
            real = {k: v.detach() for k, v in self.shadow(x_pub).items()}
        fake = {k: v.detach().float() for k, v in received.items()}
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss = F.softplus(-self.critic(real)).mean() + F.softplus(self.critic(fake)).mean()
        critic_loss.backward()
        self.critic_opt.step()

        z = {k: v.detach().float().requires_grad_(True) for k, v in received.items()}
        site_loss = F.softplus(-self.critic(z)).mean()
        grads = torch.autograd.grad(site_loss, list(z.values()))
        return {k: g.detach().to(received[k].dtype) for k, g in zip(z, grads)}

    def reconstruct(self, received: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The attacker's inversion of the site's features: ``B, C_site, *spatial``."""
        self.inverse.eval()
        with torch.no_grad():
            return self.inverse({k: v.float() for k, v in received.items()})
