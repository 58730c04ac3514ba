"""Leakage metrics on small synthetic images, and the attacks' argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitunet.attacks.label_leakage import LabelLeakage, mask_from_scores
from splitunet.attacks.learned import LearnedInversion
from splitunet.attacks.unsplit import UnSplit
from splitunet.attacks.whitebox import WhiteBoxInversion
from splitunet.leakage import (
    brain_nmse,
    brain_psnr,
    brain_ssim,
    dice,
    distance_correlation,
    leak_auc,
    rdlv,
    reidentification_top1,
    semantic_leakage,
    unit_scale,
)


def brain(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.3) ** 2
    img = rng.normal(size=(size, size)).cumsum(0).cumsum(1)
    img = (img - img[inside].mean()) / img[inside].std()
    return np.where(inside, img, 0.0)


def test_brain_ssim_ignores_the_background_and_ranks_reconstructions():
    x = brain(0)
    assert brain_ssim(x, x) == pytest.approx(1.0)
    noisy = x + 0.3 * np.random.default_rng(1).normal(size=x.shape) * (x != 0)
    assert 0.2 < brain_ssim(noisy, x) < 0.99
    assert brain_ssim(brain(2), x) < brain_ssim(noisy, x)
    # whole-image SSIM credits the shared zero background; restricted to the brain it does not (both on the
    # original's [0, 1] brain range, as brain_ssim scales them)
    from skimage.metrics import structural_similarity

    other = brain(2)
    m = x != 0
    whole = structural_similarity(unit_scale(x, x, m), unit_scale(other, x, m), data_range=1.0,
                                  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert whole > brain_ssim(other, x) + 0.1
    assert brain_psnr(noisy, x) > brain_psnr(brain(2), x)
    assert brain_nmse(x, x) == 0.0 and brain_nmse(noisy, x) > 0


def test_rdlv_and_bad_arguments():
    assert rdlv(0.9, 0.45) == pytest.approx(1.0)
    assert rdlv(0.4, 0.5) < 0
    with pytest.raises(ValueError, match="positive SSIM"):
        rdlv(0.9, 0.0)
    with pytest.raises(ValueError, match="empty"):
        brain_ssim(np.ones((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="shapes"):
        brain_ssim(np.ones((8, 8)), np.ones((8, 9)))


def test_distance_correlation_detects_dependence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    assert distance_correlation(x, x * 3 + 1) == pytest.approx(1.0, abs=1e-6)
    independent = distance_correlation(x, torch.randn(200, 3, generator=g))
    assert independent < 0.35
    assert distance_correlation(x, x**2) > independent + 0.1  # a dependence correlation misses
    with pytest.raises(ValueError):
        distance_correlation(x[:1], x[:1])


def test_dice_auc_semantic_and_reidentification():
    truth = np.zeros((16, 16), bool)
    truth[4:8, 4:8] = True
    assert dice(truth, truth) == 1.0 and dice(np.zeros_like(truth), truth) == 0.0
    assert leak_auc(truth.astype(float), truth) == pytest.approx(1.0)
    assert leak_auc(np.random.default_rng(0).random(truth.shape), truth) < 0.8
    segment = lambda img: img > 1.0  # noqa: E731 - a frozen "segmenter" of bright voxels
    x = brain(3)
    assert semantic_leakage(segment, x, x) == 1.0
    cands = np.stack([brain(s) for s in range(4)])
    assert reidentification_top1([cands[2] + 0.05 * (cands[2] != 0), cands[1]], cands, [2, 1]) == 1.0
    # a candidate whose crop holds no brain (another anatomy, the same window) is never the match, not an error
    with_empty = np.concatenate([cands, np.zeros_like(cands[:1])])
    assert reidentification_top1([cands[2] + 0.05 * (cands[2] != 0)], with_empty, [2]) == 1.0
    assert mask_from_scores(np.zeros((4, 4))).sum() == 0


def test_attacks_validate_their_arguments():
    with pytest.raises(ValueError):
        WhiteBoxInversion(iterations=0)
    with pytest.raises(ValueError):
        UnSplit(main_iters=0)
    with pytest.raises(ValueError):
        LearnedInversion(steps=0)
    with pytest.raises(ValueError, match="score must be one of"):
        LabelLeakage(score="cosine")


def test_attacks_run_in_3d_and_at_deeper_cuts():
    from splitunet.attacks.base import Observation
    from splitunet.config import SiteSpec, SplitUNetConfig
    from splitunet.networks.factory import make_site_encoder

    config = SplitUNetConfig(spatial_dims=3, features=(4, 8, 16), sites=(SiteSpec(name="t2", modalities=("t2",)),),
                             cut_level=1)
    encoder = make_site_encoder(config, "t2", 0).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        features = encoder(x)
    obs = Observation(config=config, site="t2", activations=features, encoder_state=encoder.state_dict())
    assert WhiteBoxInversion(iterations=3)(obs).shape == x.shape
    assert UnSplit(main_iters=1, input_iters=2, model_iters=2)(obs).shape == x.shape
    learned = LearnedInversion(steps=2, batch_size=2, width=4).fit(encoder, config, "t2", torch.randn(3, 1, 16, 16, 16))
    assert learned(obs).shape == x.shape
    grads = {k: torch.randn_like(v) for k, v in features.items()}
    scores = LabelLeakage()(Observation(config=config, site="t2", activations=features, gradients=grads))
    assert scores.shape == (1, 1, 16, 16, 16) and float(scores.min()) >= 0 and float(scores.max()) <= 1
