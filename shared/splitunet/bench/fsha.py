"""The FSHA bench row: does the data owner's leakage gate stop a hijacking aggregator, how fast, and how often
does it stop an honest one?

One site (``t1``) trains with an aggregator in process on phantom crops (2D, ``size`` x ``size`` in the brain of
128 x 128 x 80 phantom volumes from a federation seed; the public cohort is disjoint). The aggregator is either
honest (it trains the decoder on its labels and returns the task's gradients) or the FSHA attacker
(:mod:`splitunet.attacks.fsha`). Every ``every`` steps the site's gate runs its own attack on the batch it just
sent, with its own weights, exactly as the site service's gate does (:mod:`services.client_site.leakage_gate`):
the learned inversion through its own encoder trained on the public cohort (the gate's ``attacks``), scored by
brain SSIM against its own originals, and stops at ``max_ssim``. Per run the row reports the step the gate
stopped (None: never), the gate's SSIM then, and the FSHA attacker's own reconstruction SSIM at that step (what
the attack had achieved when it was stopped); over the honest runs, the fraction the gate stopped (false alarms).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from splitunet.attacks.base import Observation
from splitunet.attacks.fsha import FSHAServer
from splitunet.attacks.learned import LearnedInversion
from splitunet.attacks.whitebox import WhiteBoxInversion
from splitunet.auditing.cohorts import PublicCohort
from splitunet.config import SiteSpec, SplitUNetConfig
from splitunet.data.sampling import Sample
from splitunet.leakage import brain_ssim
from splitunet.training import InProcessFederation

logger = logging.getLogger(__name__)

#: Phantom volume grid of the bench (the attack tests' grid).
SHAPE = (128, 128, 80)


@dataclass(frozen=True)
class FSHAPlan:
    """The bench's settings: the run, the gate, and how many honest runs measure false alarms."""

    steps: int = 60
    every: int = 10
    max_ssim: float = 0.5
    attack: str = "learned"
    attack_steps: int = 200
    honest_runs: int = 5
    size: int = 64
    batch_size: int = 4
    cut_level: int = 1
    features: tuple[int, ...] = (8, 16, 32)
    lr: float = 1e-3
    cases: int = 8
    public_cases: int = 8

    @classmethod
    def quick(cls) -> FSHAPlan:
        return cls(steps=6, every=3, attack_steps=20, honest_runs=1, size=32, cases=2, public_cases=2)


class _Data:
    """Training crops of the federation's cohort and the public cohort, cut around the brain's centre."""

    def __init__(self, plan: FSHAPlan, seed: int) -> None:
        self.plan = plan
        self.cohort = PublicCohort(SHAPE, plan.cases, seed=1)  # not the public seed: disjoint from the public
        self.public = PublicCohort(SHAPE, plan.public_cases)
        self.rng = np.random.default_rng(seed)
        s = plan.size
        self.template = Sample(case_id="x", start=(SHAPE[0] // 2 - s // 2, SHAPE[1] // 2 - s // 2), size=(s, s),
                               axial_index=SHAPE[2] // 2, volume_shape=SHAPE)

    def _samples(self) -> list[Sample]:
        out = []
        for _ in range(self.plan.batch_size):
            z = int(self.rng.integers(SHAPE[2] // 2 - 8, SHAPE[2] // 2 + 8))
            out.append(self.template.model_copy(update={"axial_index": z}))
        return out

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, list[Sample]]:
        """``images (B, 1, s, s)`` of random cases (t1), ``regions (B, 3, s, s)``, the samples."""
        samples = self._samples()
        cases = self.rng.integers(0, self.plan.cases, len(samples))
        images = self.cohort.images(samples, ["t1"])  # (N, B, 1, s, s)
        regions = self.cohort.regions(samples)
        pick = np.arange(len(samples))
        return (torch.from_numpy(images[cases, pick]).float(), torch.from_numpy(regions[cases, pick]).float(),
                samples)


def _config(plan: FSHAPlan) -> SplitUNetConfig:
    return SplitUNetConfig(spatial_dims=2, features=plan.features, sites=(SiteSpec(name="t1", modalities=("t1",)),),
                           cut_level=plan.cut_level, skips="none")


def _ssim(recon: torch.Tensor, images: torch.Tensor) -> float:
    values = [brain_ssim(recon[i, 0].numpy(), images[i, 0].numpy()) for i in range(images.shape[0])
              if (images[i, 0] != 0).any()]
    return float(np.mean(values)) if values else float("nan")


def gate_ssim(plan: FSHAPlan, config: SplitUNetConfig, data: _Data, sent: dict, state: dict,
              images: torch.Tensor, samples: list[Sample]) -> float:
    """The site's own attack on what it sent (its weights, the public cohort): brain SSIM to its originals."""
    prior = torch.from_numpy(data.public.prior(samples, ["t1"])).float()
    obs = Observation(config=config, site="t1", activations=sent, encoder_state=state, prior=prior)
    if plan.attack == "whitebox":
        recon = WhiteBoxInversion(iterations=plan.attack_steps)(obs)
    else:
        aux = torch.from_numpy(data.public.training_images(samples, ["t1"])).float()
        recon = LearnedInversion(steps=plan.attack_steps).fit(obs.encoder(), config, "t1", aux)(obs)
    return _ssim(recon, images)


def run_once(plan: FSHAPlan, *, malicious: bool, seed: int) -> dict:
    """One run; returns the gate's checks and the step it stopped (None: it never did)."""
    config = _config(plan)
    data = _Data(plan, seed)
    fed = InProcessFederation(config, seed=seed, lr_site=plan.lr, lr_server=plan.lr, loss="dice_ce")
    site = fed.sites["t1"]
    attacker = None
    if malicious:
        aux = torch.from_numpy(data.public.training_images([data.template], ["t1"])).float()
        attacker = FSHAServer(config, "t1", aux, lr=plan.lr, seed=seed)
    checks, stopped = [], None
    for step in range(1, plan.steps + 1):
        images, regions, samples = data.batch()
        sent = dict(site.forward(images, step=step))
        if attacker is None:
            gradients = fed.aggregator.step({"t1": sent}, regions, step=step).gradients["t1"]
        else:
            gradients = attacker.gradients(sent)
        site.backward(gradients, step=step)
        if step % plan.every:
            continue
        # the gate: the batch of this step as the site sent it, with the weights that forward used
        state = {k: v.detach().clone() for k, v in site.encoder.state_dict().items()}
        with torch.no_grad():
            sent_now = {k: v.detach() for k, v in site.encoder(images).items()}
        ssim = gate_ssim(plan, config, data, sent_now, state, images, samples)
        attack = None if attacker is None else _ssim(attacker.reconstruct(sent_now), images)
        checks.append({"step": step, "gate_ssim": ssim, "attacker_ssim": attack})
        logger.info("%s run seed %d step %d: gate SSIM %.3f, attacker SSIM %s", "FSHA" if malicious else "honest",
                    seed, step, ssim, attack)
        if ssim > plan.max_ssim:
            stopped = step
            break
    return {"malicious": malicious, "seed": seed, "stopped_at": stopped, "checks": checks}


def run_fsha_bench(plan: FSHAPlan, progress: Callable[[str], None] | None = None) -> dict:
    """The bench row: the FSHA run and ``plan.honest_runs`` honest runs (seeds 1..n)."""
    progress = progress or (lambda _: None)
    t0 = time.perf_counter()
    progress("FSHA run")
    attack = run_once(plan, malicious=True, seed=0)
    honest = []
    for seed in range(1, plan.honest_runs + 1):
        progress(f"honest run {seed}/{plan.honest_runs}")
        honest.append(run_once(plan, malicious=False, seed=seed))
    last = attack["checks"][-1] if attack["checks"] else {}
    return {
        "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items()},
        "steps_to_detection": attack["stopped_at"],
        "gate_ssim_at_detection": last.get("gate_ssim") if attack["stopped_at"] else None,
        "attacker_ssim_at_detection": last.get("attacker_ssim") if attack["stopped_at"] else None,
        "attacker_ssim_last_check": last.get("attacker_ssim"),
        "false_alarms": sum(r["stopped_at"] is not None for r in honest),
        "honest_runs": len(honest),
        "honest_max_gate_ssim": max((c["gate_ssim"] for r in honest for c in r["checks"]), default=None),
        "fsha_checks": attack["checks"],
        "honest": honest,
        "seconds": time.perf_counter() - t0,
    }
