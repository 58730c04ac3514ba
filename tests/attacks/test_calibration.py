"""Calibration against the undefended case (an attack that is weak is a broken audit), and the trends defenses
must produce. Phantom 128 x 128 slices, site t1, widths 16-32-64-128.

The calibrated-noise defense and the gradient defense are *test doubles* here (Gaussian noise of
``sigma0 * P95(|tensor|)`` through the :class:`~splitunet.filters.TensorFilter` protocol); the real defenses are
built under ``splitunet.defenses`` and can replace them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from phantom_slices import Slices, site_config

from splitunet.attacks.base import Observation
from splitunet.attacks.label_leakage import LabelLeakage, mask_from_scores
from splitunet.attacks.learned import LearnedInversion
from splitunet.attacks.unsplit import UnSplit
from splitunet.attacks.whitebox import WhiteBoxInversion
from splitunet.filters import Direction, FilterChain, FilterContext
from splitunet.leakage import brain_ssim, dice, leak_auc
from splitunet.losses import make_loss
from splitunet.networks.factory import make_server_decoder, make_site_encoder
from splitunet.protocol import AggregatorStep

logger = logging.getLogger(__name__)


class GaussianNoiseDouble:
    """Test double of the calibrated-noise defense: adds N(0, (sigma0 * P95(|t|))^2) to every tensor."""

    def __init__(self, sigma0: float, seed: int = 0) -> None:
        self.sigma0, self.generator = sigma0, torch.Generator().manual_seed(seed)

    def __call__(self, tensors, context: FilterContext) -> dict[str, torch.Tensor]:
        return {k: v + self.sigma0 * torch.quantile(v.abs().flatten().float(), 0.95)
                * torch.randn(v.shape, generator=self.generator) for k, v in tensors.items()}


def _ssim(recon: torch.Tensor, x: np.ndarray) -> float:
    return float(np.mean([brain_ssim(recon[b, 0].numpy(), x[b, 0]) for b in range(x.shape[0])]))


def _observe(slices: Slices, cut_level: int = 0, skips: str = "all", sigma0: float = 0.0):
    config = site_config(cut_level, skips)
    encoder = make_site_encoder(config, "t1", seed=3).eval()
    x = slices.images[:, :1]
    with torch.no_grad():
        features = encoder(torch.from_numpy(x))
    if sigma0:
        context = FilterContext("audit-test", 1, "t1", Direction.ACTIVATIONS)
        features = FilterChain([GaussianNoiseDouble(sigma0)])(features, context)
    prior = torch.from_numpy(slices.public.prior(slices.samples, ["t1"]))
    obs = Observation(config=config, site="t1", activations=features, encoder_state=encoder.state_dict(), prior=prior)
    return obs, x, encoder


def test_whitebox_is_strong_undefended_and_falls_monotonically_with_noise(slices: Slices):
    prior_ssim = _ssim(torch.from_numpy(slices.public.prior(slices.samples, ["t1"])), slices.images[:, :1])
    figures = {}
    for sigma0 in (0.0, 0.5, 1.0, 2.0):
        obs, x, _ = _observe(slices, sigma0=sigma0)
        figures[sigma0] = _ssim(WhiteBoxInversion(iterations=200)(obs), x)
    logger.warning("white-box brain SSIM by sigma0 %s (prior %.3f)", figures, prior_ssim)
    assert figures[0.0] >= 0.8, figures
    assert figures[0.0] > figures[0.5] > figures[1.0] > figures[2.0], figures
    assert figures[0.0] > prior_ssim + 0.3


def test_whitebox_falls_at_cut_2_with_high_resolution_skips_dropped(slices: Slices):
    obs0, x, _ = _observe(slices, 0)
    obs2, _, _ = _observe(slices, 2, "none")
    shallow = _ssim(WhiteBoxInversion(iterations=200)(obs0), x)
    deep = _ssim(WhiteBoxInversion(iterations=200)(obs2), x)
    logger.warning("white-box brain SSIM cut 0: %.3f, cut 2 without skips: %.3f", shallow, deep)
    assert deep < shallow - 0.1, (shallow, deep)


def test_unsplit_and_learned_inversion_produce_measured_figures(slices: Slices):
    obs, x, encoder = _observe(slices)
    prior = obs.prior
    prior_ssim = _ssim(prior.expand(x.shape[0], -1, -1, -1), x)
    unsplit = UnSplit(main_iters=4, input_iters=10, model_iters=10)
    unsplit_ssim = _ssim(unsplit(obs), x)
    aux = torch.from_numpy(slices.public.training_images(slices.samples, ["t1"]))
    learned = LearnedInversion(steps=100, batch_size=4, width=16).fit(encoder, obs.config, "t1", aux)
    learned_ssim = _ssim(learned(obs), x)
    logger.warning("brain SSIM: prior %.3f, UnSplit %.3f, learned %.3f", prior_ssim, unsplit_ssim, learned_ssim)
    assert np.isfinite(unsplit_ssim) and np.isfinite(learned_ssim)
    assert learned_ssim > prior_ssim, (learned_ssim, prior_ssim)
    assert unsplit.clone is not None


def _label_leak(slices: Slices, sigma0: float = 0.0) -> tuple[float, float]:
    config = site_config(0)
    encoder = make_site_encoder(config, "t1", seed=3)
    decoder = make_server_decoder(config, seed=3)
    filters = FilterChain([GaussianNoiseDouble(sigma0, seed=1)]) if sigma0 else FilterChain()
    step = AggregatorStep(decoder, make_loss("dice"), None, filters)
    with torch.no_grad():
        features = encoder(torch.from_numpy(slices.images[:, :1]))
    result = step.step({"t1": features}, torch.from_numpy(slices.regions))
    obs = Observation(config=config, site="t1", activations=features, gradients=result.gradients["t1"])
    scores = LabelLeakage()(obs).numpy()[:, 0]
    truth = slices.regions[:, 1].astype(bool)
    d = float(np.mean([dice(mask_from_scores(scores[i]), truth[i]) for i in range(len(truth))]))
    auc = float(np.mean([leak_auc(scores[i], truth[i]) for i in range(len(truth))]))
    return d, auc


def test_label_leakage_beats_baselines_and_gradient_noise_reduces_it(slices: Slices):
    truth = slices.regions[:, 1].astype(bool)
    freq = slices.public.masks(slices.samples).mean(0)[:, 0]
    blob = float(np.mean([dice(freq[i] >= 0.5 * freq[i].max(), truth[i]) for i in range(len(truth))]))
    empty = float(np.mean([dice(np.zeros_like(t), t) for t in truth]))
    undefended, auc = _label_leak(slices)
    defended, auc_defended = _label_leak(slices, sigma0=1.0)
    logger.warning("label leakage Dice %.3f (AUC %.3f); baselines empty %.3f blob %.3f; with gradient noise "
                   "Dice %.3f (AUC %.3f)", undefended, auc, empty, blob, defended, auc_defended)
    assert undefended > max(empty, blob) + 0.2, (undefended, empty, blob)
    assert auc > 0.8
    assert defended < undefended - 0.2, (defended, undefended)
