"""Label DP against the site's strongest label attack: at the study's setting (epsilon 8 against all four sites,
calibrated for 100 releases, q = 1, replace-one) the best of every score and threshold (the audit's attack,
:func:`~splitunet.attacks.label_leakage.evaluate_label_leakage`) falls to the public-cohort baseline, while the same
attack on the undefended gradients beats it (calibration). Phantom 128 x 128 slices, site t1, cut 0."""

from __future__ import annotations

import logging

import numpy as np
import torch
from phantom_slices import Slices, site_config

from splitunet.attacks.base import Observation
from splitunet.attacks.label_leakage import LabelLeakage, LeakageScore, evaluate_label_leakage
from splitunet.defenses import build_gradient_chain
from splitunet.defenses.config import LabelDPConfig
from splitunet.filters import FilterChain
from splitunet.leakage import dice
from splitunet.losses import make_loss
from splitunet.networks.factory import make_server_decoder, make_site_encoder
from splitunet.protocol import AggregatorStep

logger = logging.getLogger(__name__)


def best_label_attack(slices: Slices, filters: FilterChain) -> tuple[float, float, torch.Tensor]:
    """The best label attack's (Dice, AUC) from the gradients the t1 site receives through ``filters``, and the
    per-sample gradient norms."""
    config = site_config(0)
    encoder = make_site_encoder(config, "t1", seed=3)
    step = AggregatorStep(make_server_decoder(config, seed=3), make_loss("dice_ce"), None, filters)
    with torch.no_grad():
        features = encoder(torch.from_numpy(slices.images[:, :1]))
    groups = [s.case_id for s in slices.samples]
    gradients = step.step({"t1": features}, torch.from_numpy(slices.regions), groups=groups).gradients["t1"]
    obs = Observation(config=config, site="t1", activations=features, gradients=gradients)
    scores = {kind: list(LabelLeakage(score=kind)(obs).numpy()[:, 0]) for kind in LeakageScore}
    truths = list(slices.regions[:, 1].astype(bool))
    fractions = list(slices.public.masks(slices.samples).mean(0)[:, 0].reshape(len(truths), -1).mean(1))
    figures = evaluate_label_leakage(scores, truths, fractions)
    assert figures is not None
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in gradients.values()]).sum(0).sqrt()
    return figures.dice, figures.auc, norms


def test_label_dp_at_epsilon_8_takes_the_best_label_attack_to_the_baseline(slices: Slices) -> None:
    truth = slices.regions[:, 1].astype(bool)
    freq = slices.public.masks(slices.samples).mean(0)[:, 0]
    blob = float(np.mean([dice(freq[i] >= 0.5 * freq[i].max(), truth[i]) for i in range(len(truth))]))
    undefended, auc, norms = best_label_attack(slices, FilterChain())
    config = LabelDPConfig(epsilon=8.0, clip=float(norms.median()), releases=100, sites=4, seed=1)
    defended, auc_defended, _ = best_label_attack(slices, build_gradient_chain([config]))
    logger.warning("best label attack: undefended Dice %.3f (AUC %.3f), label DP eps 8 Dice %.3f (AUC %.3f), "
                   "blob baseline %.3f", undefended, auc, defended, auc_defended, blob)
    assert undefended > blob + 0.2 and auc > 0.9, (undefended, auc, blob)  # the attack is calibrated
    assert defended < blob + 0.05 and auc_defended < 0.65, (defended, auc_defended, blob)
