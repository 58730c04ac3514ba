"""UnSplit (Erdogan, Kupcu, Cicek, WPES 2022): inversion knowing only the architecture, not the weights.

The attacker alternates between the image and a cloned encoder (fresh weights of the public architecture)::

    repeat main_iters times:
        input_iters Adam steps on x_hat:   ||clone(x_hat) - F||^2 / ||F||^2 + tv_weight TV(x_hat) + l2 ||x_hat||^2
        model_iters Adam steps on clone:   ||clone(x_hat) - F||^2 / ||F||^2

from the prior image. ``x_hat`` is ``B, C_site, *spatial``. The clone is kept (:attr:`UnSplit.clone`) so it can
serve as the shadow encoder of a learned inversion.
"""

from __future__ import annotations

import torch

from splitunet.attacks.base import AttackKind, Observation, Target, feature_mismatch, standardise, total_variation
from splitunet.networks.factory import make_site_encoder
from splitunet.networks.split_unet import SiteEncoder


class UnSplit:
    """Args:
        main_iters, input_iters, model_iters: rounds and Adam steps per round (image, clone).
        lr_input, lr_model: Adam learning rates.
        tv_weight, l2_weight: image regularisers.
        seed: the clone's initialisation seed (the attacker's own).
    """

    kind = AttackKind.UNSPLIT
    target = Target.IMAGES

    def __init__(self, *, main_iters: int = 20, input_iters: int = 20, model_iters: int = 20, lr_input: float = 0.05,
                 lr_model: float = 1e-3, tv_weight: float = 1e-2, l2_weight: float = 0.0, seed: int = 12345) -> None:
        if min(main_iters, input_iters, model_iters) < 1:
            raise ValueError("main_iters, input_iters and model_iters must be >= 1")
        if lr_input <= 0 or lr_model <= 0 or tv_weight < 0 or l2_weight < 0:
            raise ValueError("learning rates must be > 0 and the regulariser weights >= 0")
        self.main_iters, self.input_iters, self.model_iters = main_iters, input_iters, model_iters
        self.lr_input, self.lr_model, self.tv_weight, self.l2_weight = lr_input, lr_model, tv_weight, l2_weight
        self.seed = seed
        self.clone: SiteEncoder | None = None

    def __call__(self, observation: Observation) -> torch.Tensor:
        clone = make_site_encoder(observation.config, observation.site, self.seed)
        clone.eval()  # the same normalisation in every call (instance norm keeps no running state)
        target = {k: v.detach().float() for k, v in observation.activations.items()}
        x = observation.start_image().requires_grad_(True)
        opt_x = torch.optim.Adam([x], lr=self.lr_input)
        opt_m = torch.optim.Adam(clone.parameters(), lr=self.lr_model)
        for _ in range(self.main_iters):
            clone.requires_grad_(False)
            for _ in range(self.input_iters):
                opt_x.zero_grad(set_to_none=True)
                loss = feature_mismatch(clone(x), target) + self.tv_weight * total_variation(x)
                if self.l2_weight:
                    loss = loss + self.l2_weight * (x**2).mean()
                loss.backward()
                opt_x.step()
            clone.requires_grad_(True)
            fixed = x.detach()
            for _ in range(self.model_iters):
                opt_m.zero_grad(set_to_none=True)
                feature_mismatch(clone(fixed), target).backward()
                opt_m.step()
        self.clone = clone.requires_grad_(False)
        return x.detach() if observation.prior is not None else standardise(x.detach())
