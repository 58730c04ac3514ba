"""Joint white-box inversion of a secure sum: every site's images from the decoded sum of their features.

Secure-sum fusion (:mod:`splitunet.secure_sum`) hides each site's tensor ``F_k`` behind pairwise masks, but the
masks cancel in the sum and the aggregator (anyone holding the transcript) decodes ``S = sum_k F_k`` exactly:
``S = decode(sum_k M_k mod 2**bits)`` (:func:`decode_sum`, the aggregator's own :class:`SumUnmasker`). Inverting one
masked ``M_k`` attacks uniform noise and proves nothing. Knowing every site's encoder (the white-box upper bound),
the attacker solves for all sites' images at once::

    {x_hat_k} = argmin  sum_level ||sum_k f_k(x_k) - S||^2 / ||S||^2  +  tv_weight * sum_k TV(x_k)

with Adam from each site's prior image (the public cohort's mean image cut like the sample). Every ``x_k`` is
``B, C_k, *spatial``; the result is scored per site (per modality), like any image attack.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from splitunet.attacks.base import AttackKind, Target, feature_mismatch, standardise, total_variation
from splitunet.config import SplitUNetConfig
from splitunet.networks.split_unet import SiteEncoder
from splitunet.secure_sum import SecureSumOptions, SumUnmasker

logger = logging.getLogger(__name__)


def decode_sum(masked: Mapping[str, Mapping[str, torch.Tensor]], options: SecureSumOptions,
               order: Sequence[str]) -> dict[str, torch.Tensor]:
    """The sum ``{name: B, C, *spatial/2**level}`` decoded from every site's masked tensors of one forward
    (``{site: {name: float32 integers in [0, 2**bits)}}``), exactly as the aggregator decodes it."""
    return SumUnmasker(options, order)(masked)[order[0]]


@dataclass(frozen=True)
class SumObservation:
    """What the holder of a secure-sum transcript knows about one forward, plus the sites' encoders (white-box).

    Args:
        config: the model configuration (every site's encoder architecture).
        sites: the sites in the sum (fusion order).
        summed: the decoded sum ``{name: B, C, *spatial / 2**level}``.
        encoder_states: each site's encoder ``state_dict`` at that step.
        priors: each site's start image ``B, C_site, *spatial`` (missing or ``None``: zeros, result standardised).
    """

    config: SplitUNetConfig
    sites: tuple[str, ...]
    summed: Mapping[str, torch.Tensor]
    encoder_states: Mapping[str, Mapping[str, torch.Tensor]]
    priors: Mapping[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        missing = [s for s in self.sites if s not in self.encoder_states]
        if missing:
            raise ValueError(f"the joint inversion needs every site's encoder weights; missing {missing}")
        if not self.summed:
            raise ValueError("the joint inversion needs the decoded sum; got no tensor")

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.summed.values())).shape[0])

    @property
    def spatial(self) -> tuple[int, ...]:
        name, t = next(iter(self.summed.items()))
        level = int(name.removeprefix("level"))
        return tuple(int(s) * 2**level for s in t.shape[2:])

    def start_image(self, site: str) -> torch.Tensor:
        shape = (self.batch_size, self.config.site(site).in_channels, *self.spatial)
        prior = self.priors.get(site)
        return torch.zeros(shape) if prior is None else prior.float().expand(shape).clone()

    def encoder(self, site: str) -> SiteEncoder:
        encoder = SiteEncoder(self.config, site)
        encoder.load_state_dict(dict(self.encoder_states[site]))
        encoder.eval()
        return encoder.requires_grad_(False)


class JointSumInversion:
    """Args:
        iterations: Adam steps; lr: Adam learning rate; tv_weight: total-variation weight per site image.
    Calling it returns ``{site: B, C_site, *spatial}`` reconstructions.
    """

    kind = AttackKind.SECURE_SUM_JOINT
    target = Target.IMAGES

    def __init__(self, *, iterations: int = 1000, lr: float = 0.1, tv_weight: float = 1e-3) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if lr <= 0 or tv_weight < 0:
            raise ValueError("lr must be > 0 and tv_weight >= 0")
        self.iterations, self.lr, self.tv_weight = iterations, lr, tv_weight

    def __call__(self, observation: SumObservation) -> dict[str, torch.Tensor]:
        encoders = {s: observation.encoder(s) for s in observation.sites}
        target = {k: v.detach().float() for k, v in observation.summed.items()}
        xs = {s: observation.start_image(s).requires_grad_(True) for s in observation.sites}
        optimizer = torch.optim.Adam(list(xs.values()), lr=self.lr)
        for _ in range(self.iterations):
            optimizer.zero_grad(set_to_none=True)
            outputs = [encoders[s](xs[s]) for s in observation.sites]
            total = {k: sum(o[k] for o in outputs) for k in target}
            loss = feature_mismatch(total, target) + self.tv_weight * sum(total_variation(x) for x in xs.values())
            loss.backward()
            optimizer.step()
        logger.debug("joint inversion of the secure sum over %s: final loss %.4g", observation.sites, loss.item())
        return {s: x.detach() if observation.priors.get(s) is not None else standardise(x.detach())
                for s, x in xs.items()}
