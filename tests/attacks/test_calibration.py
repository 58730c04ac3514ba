"""Calibration against the undefended case (an attack that is weak is a broken audit), and the trends defenses
must produce. Phantom 128 x 128 slices, site t1, widths 16-32-64-128.

The defenses are the project's own, built as the services build them: the site's calibrated ``gaussian`` noise
(``sigma = sigma0 * P95(|F|)``) from its validated ``SITE_DEFENSES`` list (:func:`parse_site_defenses`, then
:func:`build_site_defenses`, as ``SiteProtection`` does), and the aggregator's gradient defenses (``gaussian``,
``dp``, ``smooth``, ``norm_equalize``) from a job's validated ``gradient_defenses`` list through
:func:`build_gradient_chain`, as the aggregator's trainer does. Noise seeds are fixed for reproducibility; DP's
clip is calibrated to the undefended batch's median per-sample gradient norm. DP and strong gradient noise
(sigma0 = 4) reduce label leakage; smoothing, norm equalisation and mild gradient noise (sigma0 = 1) do not
(measured against the per-voxel gradient-norm score, issue 21: the earlier direction score made sigma0 = 1 look
protective), so that test checks the attack sees through them.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from phantom_slices import Slices, site_config

from splitunet.attacks.base import Observation
from splitunet.attacks.label_leakage import LabelLeakage, mask_from_scores
from splitunet.attacks.learned import LearnedInversion
from splitunet.attacks.unsplit import UnSplit
from splitunet.attacks.whitebox import WhiteBoxInversion
from splitunet.defenses import GradientDefenseConfig, build_gradient_chain, build_site_defenses, parse_site_defenses
from splitunet.filters import Direction, FilterChain, FilterContext
from splitunet.leakage import brain_ssim, dice, leak_auc
from splitunet.losses import make_loss
from splitunet.networks.factory import make_server_decoder, make_site_encoder
from splitunet.protocol import AggregatorStep

logger = logging.getLogger(__name__)


def site_noise(sigma0: float) -> FilterChain:
    """The site's outbound chain for ``SITE_DEFENSES=[{"name": "gaussian", "sigma0": ...}]``."""
    configs = parse_site_defenses([{"name": "gaussian", "sigma0": sigma0, "seed": 0}])
    chain = build_site_defenses(configs).chain
    assert [type(f).__name__ for f in chain.filters] == ["GaussianNoise"]
    return chain


def gradient_chain(defenses: list[dict]) -> FilterChain:
    """The aggregator's gradient chain for a job's ``gradient_defenses`` list (validated as the job spec does)."""
    from pydantic import TypeAdapter

    return build_gradient_chain(TypeAdapter(list[GradientDefenseConfig]).validate_python(defenses))


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
        features = site_noise(sigma0)(features, context)
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


def _label_leak(slices: Slices, filters: FilterChain | None = None) -> tuple[float, float, torch.Tensor]:
    """Label-leakage Dice and AUC of the curious t1 site from the gradients the aggregator returns through
    ``filters``, and the per-sample L2 norms of those gradients (``B``)."""
    config = site_config(0)
    encoder = make_site_encoder(config, "t1", seed=3)
    decoder = make_server_decoder(config, seed=3)
    step = AggregatorStep(decoder, make_loss("dice"), None, filters or FilterChain())
    with torch.no_grad():
        features = encoder(torch.from_numpy(slices.images[:, :1]))
    result = step.step({"t1": features}, torch.from_numpy(slices.regions))
    gradients = result.gradients["t1"]
    obs = Observation(config=config, site="t1", activations=features, gradients=gradients)
    scores = LabelLeakage()(obs).numpy()[:, 0]
    truth = slices.regions[:, 1].astype(bool)
    d = float(np.mean([dice(mask_from_scores(scores[i]), truth[i]) for i in range(len(truth))]))
    auc = float(np.mean([leak_auc(scores[i], truth[i]) for i in range(len(truth))]))
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in gradients.values()]).sum(0).sqrt()
    return d, auc, norms


@pytest.fixture(scope="module")
def undefended_leak(slices: Slices) -> tuple[float, float, torch.Tensor]:
    return _label_leak(slices)


def _baselines(slices: Slices) -> tuple[float, float]:
    """Dice of an empty mask and of the public cohort's tumour-frequency blob."""
    truth = slices.regions[:, 1].astype(bool)
    freq = slices.public.masks(slices.samples).mean(0)[:, 0]
    blob = float(np.mean([dice(freq[i] >= 0.5 * freq[i].max(), truth[i]) for i in range(len(truth))]))
    return float(np.mean([dice(np.zeros_like(t), t) for t in truth])), blob


def test_label_leakage_beats_baselines_undefended(slices: Slices, undefended_leak):
    empty, blob = _baselines(slices)
    undefended, auc, _ = undefended_leak
    logger.warning("label leakage Dice %.3f (AUC %.3f); baselines empty %.3f blob %.3f", undefended, auc, empty, blob)
    assert undefended > max(empty, blob) + 0.2, (undefended, empty, blob)
    assert auc > 0.8


def _with_clip(defenses: list[dict], norms: torch.Tensor) -> list[dict]:
    """DP's clip ``"median"`` becomes the undefended batch's median per-sample gradient norm (as one calibrates C)."""
    return [d | {"clip": float(norms.median())} if d.get("clip") == "median" else d for d in defenses]


#: A job's ``gradient_defenses`` that must reduce the leak.
REDUCING = {
    # sigma0 = 1 measured no reduction against the norm score (Dice 0.771 vs 0.755); 4 measured 0.416
    "gaussian": [{"name": "gaussian", "sigma0": 4.0, "seed": 1}],
    "dp": [{"name": "dp", "clip": "median", "noise_multiplier": 0.1, "seed": 1}],
    "norm_equalize+smooth+dp": [{"name": "norm_equalize"}, {"name": "smooth", "sigma": 4.0},
                                {"name": "dp", "clip": "median", "noise_multiplier": 0.1, "seed": 1}],
}


@pytest.mark.parametrize("label", list(REDUCING))
def test_the_aggregators_gradient_defenses_reduce_label_leakage(slices: Slices, undefended_leak, label: str):
    undefended, auc, norms = undefended_leak
    defended, auc_defended, _ = _label_leak(slices, gradient_chain(_with_clip(REDUCING[label], norms)))
    logger.warning("label leakage with gradient defenses %s: Dice %.3f (AUC %.3f) vs undefended %.3f (AUC %.3f)",
                   label, defended, auc_defended, undefended, auc)
    assert defended < undefended - 0.2, (label, defended, undefended)


def test_the_attack_sees_through_gradient_smoothing_and_norm_equalisation(slices: Slices, undefended_leak):
    """Measured: smoothing the gradient map keeps the tumour blob (its outline blurs), per-sample norm equalisation
    leaves each sample's map unchanged and noise at sigma0 = 1 leaves the norm score's ranking intact (AUC 0.999),
    so none alone protects labels; the
    audit's attack must keep beating the baselines through them (a weak attack would report them as protective)."""
    empty, blob = _baselines(slices)
    undefended, _, _ = undefended_leak
    smooth, equalize = {"name": "smooth", "sigma": 4.0}, {"name": "norm_equalize"}
    chains = {"smooth": [smooth], "norm_equalize": [equalize], "norm_equalize+smooth": [equalize, smooth],
              "gaussian-1": [{"name": "gaussian", "sigma0": 1.0, "seed": 1}]}
    figures = {label: _label_leak(slices, gradient_chain(defenses))[:2] for label, defenses in chains.items()}
    logger.warning("label leakage (Dice, AUC) through %s; undefended Dice %.3f", figures, undefended)
    for label, (d, auc) in figures.items():
        assert d > max(empty, blob) + 0.2 and auc > 0.8, (label, d, auc, blob)
