"""The label-leakage audit of one site: every recorded step and sample, every method, the best one reported.

A curious site holds every gradient bundle it ever received, so the audit attacks all of them (not one step's
first samples): for each recorded (received, sent) pair of the site in the phase it computes both scores of
:class:`~splitunet.attacks.label_leakage.LabelLeakage` (norm, direction) on every sample, thresholds them (Otsu;
top-k at the public cohort's tumour fraction for the sample's geometry) and reports the method with the best mean
Dice (lab mode: the true masks are the aggregator's). Baselines on the same samples: an empty mask and the public
cohort's tumour-frequency blob; ``delta_dice`` is the best method's Dice minus the blob's, paired per sample, with
a 95 % Student-t interval (:func:`splitunet.leakage.delta_ssim`'s arithmetic).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from splitunet.attacks.base import Observation
from splitunet.attacks.label_leakage import LabelLeakage, LeakageScore, evaluate_label_leakage
from splitunet.auditing.cohorts import LabCohort, PublicCohort
from splitunet.config import SplitUNetConfig
from splitunet.leakage import delta_ssim, dice
from splitunet.recorder import Flow
from splitunet.transcript import Transcript
from splitunet.wire import DEFAULT_MAX_BYTES, decode_bundle

logger = logging.getLogger(__name__)


def _blob(public: PublicCohort | None, samples, shape) -> np.ndarray:
    """The public cohort's tumour frequency cut like each sample, ``(B, *size)`` (zeros without a cohort)."""
    return public.masks(samples).mean(0)[:, 0] if public is not None else np.zeros(shape)


def label_leakage_audit(transcript: Transcript, config: SplitUNetConfig, site: str, phase: str, lab: LabCohort,
                        public: PublicCohort | None) -> dict[str, Any] | None:
    """The Finding fields of the label attack on ``site`` over every recorded step, or ``None`` without a
    recorded gradient or a sample with a tumour."""
    received = [r for r in transcript.records(site=site, flow=Flow.RECEIVED, phase=phase) if r.samples]
    sent = {(r.step, r.seq): r for r in transcript.records(site=site, flow=Flow.SENT, phase=phase)}
    scores: dict[LeakageScore, list[np.ndarray]] = {k: [] for k in LeakageScore}
    truths: list[np.ndarray] = []
    fractions: list[float] = []
    blobs: list[np.ndarray] = []
    steps = set()
    for rec in received:
        reply = next((s for (step, seq), s in sorted(sent.items()) if step == rec.step and seq > rec.seq), None)
        if reply is None:
            continue
        samples = list(rec.samples)
        acts = decode_bundle(transcript.frame(rec), max_bytes=max(rec.nbytes, DEFAULT_MAX_BYTES)).tensors
        grads = decode_bundle(transcript.frame(reply), max_bytes=max(reply.nbytes, DEFAULT_MAX_BYTES)).tensors
        b = min(len(samples), *(v.shape[0] for v in grads.values()))
        obs = Observation(config=config, site=site, activations={k: v[:b] for k, v in acts.items()},
                          gradients={k: v[:b] for k, v in grads.items()})
        for kind in LeakageScore:
            scores[kind] += list(LabelLeakage(score=kind)(obs).numpy()[:, 0])
        truth = lab.masks(samples[:b])[:, 0].astype(bool)
        truths += list(truth)
        if public is not None:
            fractions += list(public.masks(samples[:b]).mean(axis=tuple(i for i in range(truth.ndim + 2) if i != 1)))
        else:
            fractions += [float(t.mean()) for t in truth]  # no public cohort: an oracle fraction (stated)
        blobs += list(_blob(public, samples[:b], truth.shape))
        steps.add(rec.step)
    if not truths:
        return None
    figures = evaluate_label_leakage(scores, truths, fractions)
    if figures is None:
        return None
    keep = [i for i, t in enumerate(truths) if t.any() and not t.all()]
    blob = [dice(blobs[i] >= 0.5 * blobs[i].max(), truths[i]) if blobs[i].max() > 0 else 0.0 for i in keep]
    empty = [dice(np.zeros_like(truths[i]), truths[i]) for i in keep]
    delta = delta_ssim(figures.per_sample_dice, blob)
    logger.info("label leakage of site %s over %d steps, %d samples: best %s Dice %.3f AUC %.3f", site, len(steps),
                figures.n, figures.method, figures.dice, figures.auc)
    return {"step": max(steps), "dice": figures.dice, "auc": figures.auc, "label_method": figures.method,
            "label_methods": figures.methods, "label_steps": len(steps), "n_samples": figures.n,
            "baseline_empty_dice": float(np.mean(empty)), "baseline_blob_dice": float(np.mean(blob)),
            "delta_dice": delta.mean, "delta_dice_low": delta.low, "delta_dice_high": delta.high}
