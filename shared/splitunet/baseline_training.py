"""The demo's baselines, trained in process with the Split-U-Net's budget and evaluated per case the same way.

- ``centralized``: one 4-channel U-Net of the split model's per-site widths (all modalities in one place);
- ``centralized_matched``: the same at matched capacity, its widths scaled so that its parameter count is the
  Split-U-Net's within 5 % (:func:`splitunet.networks.baselines.matched_config`): the fair upper bound;
- ``<m>`` (``t1``, ``t1ce``, ``t2``, ``flair``): one U-Net per modality, at matched capacity too (the lower bounds).

Same depth as the split model (:mod:`splitunet.networks.baselines`), same steps, batch size, crop
size, foreground ratio, flips, loss and optimiser settings as the job plan, and the same whole-volume per-case
evaluation (:meth:`splitunet.training.InProcessFederation.evaluate`, sliding windows, Dice and HD95 in mm) on the
held-out cases the aggregator validates on. Batches come from :class:`splitunet.data.dataset.BratsDataset` over the
training cases (the planner's brain-slice rule in 2D), one batch per step shared by every baseline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitunet.config import MODALITIES, SiteSpec, SplitUNetConfig
from splitunet.networks.baselines import centralized_config, matched_config, parameter_count, single_modality_config
from splitunet.training import EvalCase, InProcessFederation

logger = logging.getLogger(__name__)

#: ``on_step(baseline name, step, steps, loss)``
StepCallback = Callable[[str, int, int, float], None]


@dataclass
class BaselineResult:
    """One baseline: its final validation (``dice``/``hd95`` per region, mean and per case), losses, and wall
    seconds: ``seconds`` its training steps, ``eval_s`` its evaluation, ``data_s`` loading the shared batches (the
    same figure for every baseline: one load serves all)."""

    name: str
    validation: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    eval_s: float = 0.0
    data_s: float = 0.0
    parameters: int = 0
    features: tuple[int, ...] = ()
    postprocessed: dict[str, Any] | None = None


class BaselinesStopped(RuntimeError):
    """The baselines were asked to stop (the demo was interrupted or failed) before they finished."""


class BackgroundBaselines:
    """:func:`train_baselines` in a background thread of this process, so that they train while the service
    processes work (the study's trainings and audits): the constructor starts them and returns at once,
    :meth:`result` waits for them, :meth:`stop` (also on leaving a ``with`` block) makes them end at the next step
    and waits. ``kwargs`` are :func:`train_baselines`'s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baselines")
        self._started = time.perf_counter()
        self.seconds: float | None = None  # wall seconds from start to the end of the last baseline's evaluation
        self._future = self._pool.submit(self._train, *args, **kwargs)

    def _train(self, *args: Any, **kwargs: Any) -> dict[str, BaselineResult]:
        try:
            return train_baselines(*args, should_stop=self._stop.is_set, **kwargs)
        finally:
            self.seconds = time.perf_counter() - self._started

    def result(self) -> dict[str, BaselineResult]:
        """The baselines' results (waits for them; re-raises what stopped them)."""
        return self._future.result()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundBaselines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DeviceFederation(InProcessFederation):
    """An in-process federation whose model lives on ``device`` (batches and windows moved there and back)."""

    def __init__(self, config: SplitUNetConfig, device: torch.device, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.device = device
        self.model.to(device)  # before any optimiser step: Adam's state is still empty

    def train_step(self, images: torch.Tensor, regions: torch.Tensor, step: int,
                   sites: Sequence[str] | None = None) -> float:
        return super().train_step(images.to(self.device), regions.to(self.device), step, sites)

    def predict(self, images: torch.Tensor, sites: Sequence[str] | None = None) -> torch.Tensor:
        return super().predict(images.to(self.device), sites).cpu()


def split_config(plan: dict[str, Any]) -> SplitUNetConfig:
    """The demo's split model (one site per modality) from the job plan's ``model`` fields."""
    sites = tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES)
    return SplitUNetConfig.model_validate({**plan["model"], "sites": sites})


#: Every baseline, in training order: the equal-width and the matched-capacity centralized U-Net, then the
#: single-modality U-Nets at matched capacity.
BASELINES = ("centralized", "centralized_matched", *MODALITIES)


def baseline_config(split: SplitUNetConfig, name: str) -> SplitUNetConfig:
    """The configuration of baseline ``name`` (:data:`BASELINES`) for the split model ``split``."""
    if name == "centralized":
        return centralized_config(split)
    target = parameter_count(split)
    if name == "centralized_matched":
        return matched_config(centralized_config(split), target)
    return matched_config(single_modality_config(split, name), target)


def eval_cases(source: Path, case_ids: Sequence[str]) -> list[EvalCase]:
    """The held-out cases as whole volumes (all four modalities, regions, spacing in mm)."""
    from splitunet.data.cohort import scan_cohort
    from splitunet.data.loader import load_images, load_regions
    from splitunet.metrics import spacing_from_affine

    scan = scan_cohort(source, modalities=MODALITIES, seg=True)
    cases = []
    for case_id in case_ids:
        case = scan.case(case_id)
        images = load_images(case, MODALITIES)
        regions = load_regions(case)
        cases.append(EvalCase(case_id, torch.from_numpy(np.array(images.array)),
                              torch.from_numpy(np.asarray(regions, dtype=np.float32)),
                              tuple(float(s) for s in spacing_from_affine(images.affine_ras))))
    return cases


def train_baselines(
    source: Path, train_ids: Sequence[str], val_ids: Sequence[str], plan: dict[str, Any], *,
    device: str = "cpu", which: Sequence[str] | None = None, on_step: StepCallback | None = None,
    threads: int | None = None, should_stop: Callable[[], bool] | None = None,
) -> dict[str, BaselineResult]:
    """Train and evaluate the centralized and the single-modality baselines (``which``: a subset of
    :data:`BASELINES`, default all); results by name (see the module docstring). ``threads``: torch
    intra-op threads while they train (restored after; None keeps the process's setting), so that the baselines
    leave the cores to the service processes that work at the same time (e.g. an audit). ``should_stop`` is asked
    before each step; when it says yes, :class:`BaselinesStopped` is raised."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None to keep torch's setting), got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train_baselines(source, train_ids, val_ids, plan, device=device, which=which, on_step=on_step,
                                should_stop=should_stop or (lambda: False))
    finally:
        torch.set_num_threads(before)


def _train_baselines(
    source: Path, train_ids: Sequence[str], val_ids: Sequence[str], plan: dict[str, Any], *,
    device: str, which: Sequence[str] | None, on_step: StepCallback | None, should_stop: Callable[[], bool],
) -> dict[str, BaselineResult]:
    from splitunet.data.cache import ArrayCache
    from splitunet.data.dataset import BratsDataset

    base = split_config(plan)
    dims = base.spatial_dims
    steps, batch = int(plan["steps"]), int(plan["batch_size"])
    roi = tuple(plan["roi"])
    dataset = BratsDataset(source, spatial_dims=dims, roi=roi, fg_ratio=float(plan.get("fg_ratio", 0.0)),
                           flip_prob=float(plan.get("flip_prob", 0.0)), seed=int(plan.get("seed", 0)),
                           case_ids=list(train_ids),
                           cache=ArrayCache(max_items=4 * len(train_ids) + 8, max_bytes=4 * 2**30))
    validation = eval_cases(source, val_ids)
    site_opt, server_opt = plan.get("site_optimizer", {}), plan.get("server_optimizer", {})
    names = list(which) if which is not None else list(BASELINES)
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    models: dict[str, tuple[DeviceFederation, list[int]]] = {}
    for name in names:
        config = baseline_config(base, name)
        models[name] = (DeviceFederation(
            config, torch.device(device), seed=int(plan.get("seed", 0)), lr_site=float(site_opt.get("lr", 1e-3)),
            lr_server=float(server_opt.get("lr", 1e-3)), weight_decay=float(site_opt.get("weight_decay", 1e-5)),
            loss=plan.get("loss", "dice_ce"), schedule=site_opt.get("schedule", "constant"), total_steps=steps,
            warmup_steps=int(site_opt.get("warmup_steps", 0)),
        ), [MODALITIES.index(m) for m in config.modalities])
    # lockstep: every model sees the same batch at each step (one load serves all five, and the comparison is
    # on identical data)
    rng = np.random.default_rng(int(plan.get("seed", 0)))
    losses: dict[str, list[float]] = {n: [] for n in names}
    seconds = dict.fromkeys(names, 0.0)
    data_s = 0.0
    for step in range(1, steps + 1):
        if should_stop():
            raise BaselinesStopped(f"baselines stopped at step {step} of {steps}")
        t0 = time.perf_counter()
        dataset.set_epoch(step)
        items = [dataset[int(i)] for i in rng.integers(len(dataset), size=batch)]
        images = torch.stack([it["images"] for it in items])
        regions = torch.stack([it["regions"] for it in items])
        data_s += time.perf_counter() - t0
        for name, (federation, channels) in models.items():
            t0 = time.perf_counter()
            losses[name].append(federation.train_step(images[:, channels], regions, step))
            seconds[name] += time.perf_counter() - t0
            if on_step is not None:
                on_step(name, step, steps, losses[name][-1])
    results: dict[str, BaselineResult] = {}
    for name, (federation, channels) in models.items():
        cases = [EvalCase(c.case_id, c.images[channels], c.regions, c.spacing) for c in validation]
        federation.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            result, post = _evaluate(federation, cases, roi, batch_size=32 if dims == 2 else 2)
        results[name] = BaselineResult(name=name, validation=result, postprocessed=post, losses=losses[name],
                                       seconds=seconds[name], eval_s=time.perf_counter() - t0, data_s=data_s,
                                       parameters=parameter_count(federation.config),
                                       features=tuple(federation.config.features))
        logger.info("baseline %s: Dice %s (train %.1f s, eval %.1f s, data %.1f s)", name, result["dice"],
                    seconds[name], results[name].eval_s, data_s)
    return results


def _evaluate(federation: InProcessFederation, cases: Sequence[EvalCase], roi: Sequence[int], *, batch_size: int
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-case figures of whole-volume predictions (as :meth:`InProcessFederation.evaluate`), and the raw and
    post-processed figures of the same predictions (:func:`splitunet.postprocess.cross_validated`)."""
    from splitunet.metrics import RegionMetrics
    from splitunet.postprocess import cross_validated

    metrics = RegionMetrics(hd95=True)
    masks = []
    for case in cases:
        logits = federation.predict_case(case.images, roi, batch_size=batch_size)
        metrics.add_case(case.case_id, logits, case.regions, case.spacing)
        masks.append((logits > 0.0).numpy())
    post = cross_validated([c.case_id for c in cases], masks, [c.regions.numpy() for c in cases],
                           [c.spacing for c in cases])
    return metrics.aggregate(), post
