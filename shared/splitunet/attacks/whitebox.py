"""White-box model inversion (He, Zhang, Lee, ACSAC 2019): the upper bound of what the activations reveal.

Knowing the site encoder's weights at the recorded step, the attacker solves

    x_hat = argmin_x  sum_k ||a_b f_k(x) - F_k||^2 / ||F_k||^2  +  tv_weight * TV(x)  +  l2_weight * ||x||^2

where ``a_b`` is a per-sample scale fitted in closed form at every step (``fit_scale``, the default): what a site
sends may be scaled per sample by a defense the attacker does not control (DP's clip ``min(1, C / ||F_b||)``), and
an inversion that insists on ``a_b = 1`` chases features of the wrong norm (measured in ``tests/attacks``).

with Adam from a prior image (the cohort's mean image). ``x`` is ``B, C_site, *spatial``. An instance-normalised
first block is blind to the input's offset and scale; starting from the prior keeps the prior's (the public
preprocessing's) intensity scale, which is close to the original's; without a prior the result is standardised
per sample and channel (zero mean, unit variance: the sites' z-scoring).
"""

from __future__ import annotations

import logging

import torch

from splitunet.attacks.base import (
    AttackKind,
    Observation,
    Target,
    feature_mismatch,
    scaled_feature_mismatch,
    standardise,
    total_variation,
)

logger = logging.getLogger(__name__)


class WhiteBoxInversion:
    """Args:
        iterations: Adam steps (measured on the demo's trained encoders at cut 0: 1000 reach brain SSIM 0.8-0.99,
            200 stop half-way).
        lr: Adam learning rate (0.1: 0.05 and 0.02 converged markedly slower on z-scored images, 0.2 oscillated).
        tv_weight, l2_weight: regularisers (total variation, squared norm).
        fit_scale: fit a per-sample scale of the features in the loss (:func:`per_sample_scale`).
    """

    kind = AttackKind.WHITEBOX
    target = Target.IMAGES

    def __init__(self, *, iterations: int = 200, lr: float = 0.1, tv_weight: float = 1e-3,
                 l2_weight: float = 0.0, fit_scale: bool = True) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if lr <= 0 or tv_weight < 0 or l2_weight < 0:
            raise ValueError("lr must be > 0 and the regulariser weights >= 0")
        self.iterations, self.lr, self.tv_weight, self.l2_weight = iterations, lr, tv_weight, l2_weight
        self.fit_scale = fit_scale

    def __call__(self, observation: Observation) -> torch.Tensor:
        encoder = observation.encoder()
        target = {k: v.detach().float() for k, v in observation.activations.items()}
        x = observation.start_image().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        mismatch = scaled_feature_mismatch if self.fit_scale else feature_mismatch
        for _ in range(self.iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = mismatch(encoder(x), target) + self.tv_weight * total_variation(x)
            if self.l2_weight:
                loss = loss + self.l2_weight * (x**2).mean()
            loss.backward()
            optimizer.step()
        logger.debug("white-box inversion of site %s: final loss %.4g", observation.site, loss.item())
        return x.detach() if observation.prior is not None else standardise(x.detach())
