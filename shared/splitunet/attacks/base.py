"""The contract every attack implements: an :class:`Observation` of what one site exchanged, in; a tensor, out.

An image attack (white-box, UnSplit, learned) returns reconstructed inputs ``B, C_site, *spatial`` (the site's
modalities, in the site's preprocessing: z-scored in the brain, 0 outside); a label attack returns per-voxel
tumour scores ``B, 1, *spatial`` in ``[0, 1]``. What an attack may use is what its threat model grants: the
recorded activations always, the gradients sent to the site for a curious site, the encoder weights only for the
white-box upper bound (a site grants them for its own audit), a prior image (the mean of public cases).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

import torch

from splitunet.config import SplitUNetConfig
from splitunet.networks.split_unet import SiteEncoder


class AttackKind(StrEnum):
    WHITEBOX = "whitebox"
    UNSPLIT = "unsplit"
    LEARNED = "learned"
    LABEL_LEAKAGE = "label_leakage"
    #: the joint white-box inversion of a secure sum (:mod:`splitunet.attacks.secure_sum_joint`)
    SECURE_SUM_JOINT = "secure_sum_joint"


class Target(StrEnum):
    """What an attack recovers: the site's input images or the aggregator's labels (tumour mask)."""

    IMAGES = "images"
    LABELS = "labels"


@dataclass(frozen=True)
class Observation:
    """What an attacker holds about one batch of one site.

    Args:
        config: the model configuration (architecture is public in a federation).
        site: the site's name in ``config``.
        activations: ``{name: B, C, *spatial / 2**level}`` as received (after the site's defenses).
        gradients: ``{name: same shape}`` sent back to the site, or ``None``.
        encoder_state: the site encoder's ``state_dict`` at that step (white-box only), or ``None``.
        prior: ``B, C_site, *spatial`` starting image (the cohort's mean image), or ``None`` (zeros).
    """

    config: SplitUNetConfig
    site: str
    activations: Mapping[str, torch.Tensor]
    gradients: Mapping[str, torch.Tensor] | None = None
    encoder_state: Mapping[str, torch.Tensor] | None = None
    prior: torch.Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.activations.values())).shape[0])

    @property
    def spatial(self) -> tuple[int, ...]:
        """The input's spatial size (level-``i`` tensors are ``2**i`` times smaller)."""
        name, t = next(iter(self.activations.items()))
        level = int(name.removeprefix("level"))
        return tuple(int(s) * 2**level for s in t.shape[2:])

    @property
    def in_channels(self) -> int:
        return self.config.site(self.site).in_channels

    def start_image(self) -> torch.Tensor:
        """The prior (broadcast to the batch) or zeros: ``B, C_site, *spatial`` float32."""
        shape = (self.batch_size, self.in_channels, *self.spatial)
        if self.prior is None:
            return torch.zeros(shape)
        return self.prior.float().expand(shape).clone()

    def encoder(self, *, state: Mapping[str, torch.Tensor] | None = None) -> SiteEncoder:
        """A frozen copy of the site encoder with ``state`` (default: ``encoder_state``), in eval mode."""
        state = state if state is not None else self.encoder_state
        if state is None:
            raise ValueError("this attack needs the encoder weights (white-box); the observation has none")
        encoder = SiteEncoder(self.config, self.site)
        encoder.load_state_dict(dict(state))
        encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        return encoder


@runtime_checkable
class Attack(Protocol):
    """``attack(observation) -> images B, C_site, *spatial`` (or label scores ``B, 1, *spatial``)."""

    kind: AttackKind
    target: Target

    def __call__(self, observation: Observation) -> torch.Tensor:
        ...


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours along every spatial axis of ``B, C, *spatial``."""
    return sum(x.diff(dim=d).abs().mean() for d in range(2, x.ndim))


def feature_mismatch(outputs: Mapping[str, torch.Tensor], observed: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of the MSE normalised by the observed tensor's mean square (scale-free)."""
    return sum(((outputs[k] - v) ** 2).mean() / (v**2).mean().clamp_min(1e-8) for k, v in observed.items())


def per_sample_scale(outputs: Mapping[str, torch.Tensor], observed: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The scale ``a_b`` (``B``) that best fits ``a_b * outputs`` to ``observed`` per sample in
    :func:`feature_mismatch`'s weighted least squares (closed form, detached: at the optimum the loss's gradient
    with respect to ``a`` is 0). A per-sample L2 clip (DP's ``min(1, C / ||F_b||)``) scales each sample's
    features by an unknown factor; an inversion that does not fit it chases features of the wrong norm."""
    num, den = 0.0, 0.0
    for k, v in observed.items():
        f = outputs[k].detach()
        weight = 1.0 / ((v**2).mean().clamp_min(1e-8) * v[0].numel())
        num = num + weight * (f * v).flatten(1).sum(1)
        den = den + weight * (f * f).flatten(1).sum(1)
    return (num / den.clamp_min(1e-12)).detach()


def scaled_feature_mismatch(outputs: Mapping[str, torch.Tensor], observed: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """:func:`feature_mismatch` of ``a_b * outputs`` with the per-sample scale of :func:`per_sample_scale`."""
    scale = per_sample_scale(outputs, observed)
    return feature_mismatch({k: v * scale.view(-1, *[1] * (v.ndim - 1)) for k, v in outputs.items()}, observed)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per sample and channel of ``B, C, *spatial`` (the sites' z-scoring, known to all)."""
    dims = tuple(range(2, x.ndim))
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True).clamp_min(1e-6)
