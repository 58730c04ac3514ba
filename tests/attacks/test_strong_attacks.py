"""Issue 21's calibration of the attacks an adversary would run, against the undefended case (phantom slices, as in
``test_calibration.py``): the SSIM scale, the label attack's best method, the white-box attack's per-sample
scale under DP-like clipping, and the joint inversion of a decoded secure sum."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from phantom_slices import Slices, site_config
from skimage.metrics import structural_similarity
from test_calibration import _ssim, gradient_chain

from splitunet.attacks.base import Observation
from splitunet.attacks.label_leakage import (
    LabelLeakage,
    LeakageScore,
    evaluate_label_leakage,
    threshold_scores,
    top_k_mask,
)
from splitunet.attacks.secure_sum_joint import JointSumInversion, SumObservation, decode_sum
from splitunet.attacks.whitebox import WhiteBoxInversion
from splitunet.auditing.cohorts import PublicCohort
from splitunet.auditing.gate import GateThreshold
from splitunet.auditing.runner import Finding
from splitunet.config import MODALITIES, SiteSpec, SplitUNetConfig
from splitunet.data.sampling import extract, plan_slices
from splitunet.defenses import build_site_defenses, parse_site_defenses
from splitunet.filters import Direction, FilterContext
from splitunet.leakage import brain_ssim, delta_ssim
from splitunet.losses import make_loss
from splitunet.networks.factory import make_server_decoder, make_site_encoder
from splitunet.protocol import AggregatorStep
from splitunet.secure_sum import SecureSumOptions, SecureSumPeers, SiteMasker

logger = logging.getLogger(__name__)


def _old_scale_ssim(recon: np.ndarray, x: np.ndarray) -> float:
    """The definition before issue 21 (signed z-scored images, data range = the original's brain range)."""
    m = x != 0
    _, ssim_map = structural_similarity(x.astype(np.float64), recon.astype(np.float64), data_range=float(np.ptp(x[m])),
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    return float(ssim_map[m].mean())


def test_the_prior_of_the_quick_demos_crops_is_not_near_zero():
    """The quick demo's geometry: phantom volumes 96 x 96 x 64, 2D 64 x 64 crops of axial slices, 60 % centred on
    the tumour; a federation cohort (seed 1) and the public cohort (its own seed) of 8 cases."""
    shape = (96, 96, 64)
    federation, public = PublicCohort(shape, 3, seed=1), PublicCohort(shape, 8)
    volumes, regions = federation.volumes
    rng = np.random.default_rng(0)
    samples, originals = [], []
    for case in range(federation.n):
        for s in plan_slices(f"case-{case}", shape, (64, 64), 6, rng, foreground=regions[case, 1], fg_ratio=0.6):
            original = extract(volumes[case][:1], s)[0]  # t1
            if (original != 0).mean() > 0.1:  # the scorer skips crops without brain; so does this test
                samples.append(s)
                originals.append(original)
    prior = public.prior(samples, ["t1"])[:, 0]
    new = [brain_ssim(prior[i], originals[i]) for i in range(len(samples))]
    old = [_old_scale_ssim(prior[i], originals[i]) for i in range(len(samples))]
    logger.warning("prior brain SSIM of the quick demo's t1 crops: [0, 1] scale %.3f, old signed scale %.3f",
                   np.mean(new), np.mean(old))
    assert np.mean(new) > 0.15, new
    assert np.mean(new) > np.mean(old) + 0.05, (np.mean(new), np.mean(old))


def test_a_shifted_copy_scores_like_the_image(slices: Slices):
    x = slices.images[0, 0].astype(np.float64)
    brain = x != 0
    shifted = np.where(brain, x + 0.1, 0.0)  # +0.1 (z-units) inside the brain: a small intensity offset
    assert brain_ssim(x, x) == pytest.approx(1.0)
    assert brain_ssim(shifted, x) > 0.95, brain_ssim(shifted, x)
    assert _old_scale_ssim(shifted, x) < brain_ssim(shifted, x) - 0.05  # the signed scale penalised the offset
    # both images on the original's [0, 1]: an affine change of both leaves the figure as it was
    recon = slices.public.prior(slices.samples, ["t1"])[0, 0].astype(np.float64)
    assert brain_ssim(3 * recon + 2, 3 * x + 2, mask=brain) == pytest.approx(brain_ssim(recon, x), abs=1e-9)


def test_delta_ssim_interval():
    d = delta_ssim([0.8, 0.7, 0.9, 0.75], [0.3, 0.35, 0.25, 0.3])
    assert d.n == 4 and d.low < d.mean < d.high and d.low > 0
    assert delta_ssim([0.5], [0.4]).low is None
    with pytest.raises(ValueError, match="equal lengths"):
        delta_ssim([0.5, 0.6], [0.4])


def test_the_gate_fails_on_a_delta_ssim_interval_above_its_threshold():
    beaten = Finding(site="t1", step=3, attack="whitebox", ssim=0.6, prior_ssim=0.3, delta_ssim=0.3,
                     delta_ssim_low=0.2, delta_ssim_high=0.4, n_samples=8)
    within = beaten.model_copy(update={"delta_ssim": 0.02, "delta_ssim_low": -0.05, "delta_ssim_high": 0.09})
    gate = GateThreshold(max_delta_ssim=0.0)
    decision = gate.evaluate([within, beaten])
    assert not decision.passed and decision.figure == "delta_ssim_low" and decision.value == 0.2
    assert gate.evaluate([within]).passed


def test_top_k_and_threshold_arguments():
    scores = np.arange(16, dtype=float).reshape(4, 4)
    mask = top_k_mask(scores, 0.25)
    assert mask.sum() == 4 and mask[3].all()
    assert threshold_scores(scores, "otsu").any()
    with pytest.raises(ValueError, match="fraction"):
        top_k_mask(scores, 1.5)
    with pytest.raises(ValueError, match="tumour fraction"):
        threshold_scores(scores, "top_k")
    assert evaluate_label_leakage({LeakageScore.NORM: [scores]}, [np.zeros((4, 4), bool)], [0.1]) is None


def _gradients(slices: Slices):
    """What the curious t1 site receives at cut 0, undefended: its features and the aggregator's gradients."""
    config = site_config(0)
    encoder = make_site_encoder(config, "t1", seed=3)
    decoder = make_server_decoder(config, seed=3)
    step = AggregatorStep(decoder, make_loss("dice"), None, gradient_chain([]))
    with torch.no_grad():
        features = encoder(torch.from_numpy(slices.images[:, :1]))
    result = step.step({"t1": features}, torch.from_numpy(slices.regions))
    return Observation(config=config, site="t1", activations=features, gradients=result.gradients["t1"])


def test_label_attack_best_method_reaches_auc_09_undefended_at_cut_0(slices: Slices):
    obs = _gradients(slices)
    truth = slices.regions[:, 1].astype(bool)
    fractions = slices.public.masks(slices.samples).mean(axis=(0, 2, 3, 4))
    scores = {k: list(LabelLeakage(score=k)(obs).numpy()[:, 0]) for k in LeakageScore}
    figures = evaluate_label_leakage(scores, list(truth), list(fractions))
    logger.warning("label leakage undefended, cut 0: best %s Dice %.3f AUC %.3f; every method %s",
                   figures.method, figures.dice, figures.auc, figures.methods)
    assert figures.auc >= 0.9, figures
    # the direction score is oriented by agreement with the norm: it must not point the wrong way
    assert figures.methods["direction/otsu"]["auc"] > 0.5, figures.methods


def _dp_clipped(obs: Observation, clip: float, z: float) -> Observation:
    """The site's ``dp`` defense (per-sample L2 clip ``clip``, noise ``z * clip``) on ``obs``'s activations."""
    chain = build_site_defenses(parse_site_defenses([{"name": "dp", "clip": clip, "noise_multiplier": z,
                                                      "seed": 0}])).chain
    sent = chain(dict(obs.activations), FilterContext("audit-test", 1, "t1", Direction.ACTIVATIONS))
    return Observation(config=obs.config, site=obs.site, activations=sent, encoder_state=obs.encoder_state,
                       prior=obs.prior)


def test_the_per_sample_scale_beats_no_scale_under_dp_clipping(slices: Slices):
    config = site_config(0)
    encoder = make_site_encoder(config, "t1", seed=3).eval()
    x = slices.images[:, :1]
    with torch.no_grad():
        features = encoder(torch.from_numpy(x))
    norms = torch.stack([v.flatten(1).norm(dim=1) for v in features.values()]).norm(dim=0)
    prior = torch.from_numpy(slices.public.prior(slices.samples, ["t1"]))
    obs = Observation(config=config, site="t1", activations=features, encoder_state=encoder.state_dict(),
                      prior=prior)
    # clip far below every sample's norm (each sample scaled by its own factor), noise z = 0.01 as the study's DP
    clipped = _dp_clipped(obs, clip=float(norms.min()) / 8, z=0.01)
    scaled = _ssim(WhiteBoxInversion(iterations=300)(clipped), x)
    plain = _ssim(WhiteBoxInversion(iterations=300, fit_scale=False)(clipped), x)
    undefended = _ssim(WhiteBoxInversion(iterations=300)(obs), x)
    logger.warning("white-box under DP clipping: with per-sample scale %.3f, without %.3f (undefended %.3f)",
                   scaled, plain, undefended)
    assert scaled > plain + 0.05, (scaled, plain)


def _masked_forward(features: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Every site's tensors masked by the real secure-sum protocol (what the transcript records)."""
    maskers = {s: SiteMasker(s, "audit-test") for s in features}
    peers = SecureSumPeers(keys={s: m.public_key for s, m in maskers.items()}, order=list(features))
    for m in maskers.values():
        m.establish(peers)
    return {s: m.mask(features[s], b"nonce") for s, m in maskers.items()}


def test_the_joint_inversion_of_a_decoded_secure_sum_beats_the_prior(slices: Slices):
    config = SplitUNetConfig(spatial_dims=2, features=(16, 32, 64, 128), cut_level=0, fusion="sum",
                             sites=tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES))
    encoders = {m: make_site_encoder(config, m, seed=3 + i).eval() for i, m in enumerate(MODALITIES)}
    with torch.no_grad():
        features = {m: encoders[m](torch.from_numpy(slices.images[:, i:i + 1])) for i, m in enumerate(MODALITIES)}
    masked = _masked_forward(features)
    summed = decode_sum(masked, SecureSumOptions(), list(MODALITIES))
    exact = {k: sum(f[k] for f in features.values()) for k in summed}
    assert all(torch.allclose(summed[k], exact[k], atol=1e-4) for k in summed)
    priors = {m: torch.from_numpy(slices.public.prior(slices.samples, [m])) for m in MODALITIES}
    obs = SumObservation(config=config, sites=tuple(MODALITIES), summed=summed,
                         encoder_states={m: e.state_dict() for m, e in encoders.items()}, priors=priors)
    recon = JointSumInversion(iterations=400)(obs)
    figures = {}
    for i, m in enumerate(MODALITIES):
        x = slices.images[:, i:i + 1]
        figures[m] = (_ssim(recon[m], x), _ssim(priors[m].expand(x.shape[0], -1, -1, -1), x))
    logger.warning("joint inversion of the decoded sum, brain SSIM (reconstruction, prior): %s", figures)
    for m, (ssim, prior) in figures.items():
        assert ssim > prior + 0.1, (m, ssim, prior)
