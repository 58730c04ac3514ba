"""In-process split training: the step protocol driven in one process (no HTTP).

Used to exercise the model, as the reference the REST services are tested against, and for the baselines.
Training batches are images ``B, C, *roi`` float32 with all modalities in ``config.modalities`` order and regions
``B, 3, *roi`` (TC, WT, ET as 0/1). Evaluation is per case over whole volumes (:class:`EvalCase`), by sliding
windows and the BraTS-convention metrics of :mod:`splitunet.metrics`, as the services' validation does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from splitunet.config import SplitUNetConfig
from splitunet.filters import FilterChain
from splitunet.inference import DEFAULT_OVERLAP, predict_volume
from splitunet.losses import DEFAULT_LOSS, LossKind, make_loss
from splitunet.metrics import RegionMetrics
from splitunet.networks.factory import make_optimizer, make_split_unet
from splitunet.protocol import AggregatorStep, SiteStep
from splitunet.schedules import LrSchedule, set_lr
from splitunet.schemas import OptimizerOptions

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EvalCase:
    """One whole held-out case: images ``(C, X, Y, Z)`` float32 (``config.modalities`` order), regions
    ``(3, X, Y, Z)`` 0/1 and the voxel ``spacing`` in mm (from the case's affine)."""

    case_id: str
    images: torch.Tensor
    regions: torch.Tensor
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.regions.ndim != 4 or self.regions.shape[0] != 3:
            raise ValueError(
                f"case {self.case_id}: images must be (C, X, Y, Z) and regions (3, X, Y, Z), got "
                f"{tuple(self.images.shape)} and {tuple(self.regions.shape)}"
            )
        if tuple(self.images.shape[1:]) != tuple(self.regions.shape[1:]):
            raise ValueError(f"case {self.case_id}: images and regions have different spatial shapes")


class InProcessFederation:
    """K :class:`SiteStep` s and one :class:`AggregatorStep` over a fused model's parts.

    Args:
        config: the Split-U-Net configuration.
        seed: initialisation seed (parts are seeded as in :mod:`splitunet.networks.factory`).
        lr_site, lr_server: Adam learning rates of the encoders and of the decoder.
        weight_decay: Adam weight decay for all parts.
        loss: the loss (see :mod:`splitunet.losses`).
        schedule, total_steps, warmup_steps: the learning-rate schedule of every party
            (:mod:`splitunet.schedules`); constant unless ``total_steps`` is given.
        site_filters: ``site_filters(site name) -> outbound filter chain`` (defenses), none by default.
        site_loss_terms: site loss terms (NoPeek) of every site, none by default.
        gradient_filters: the aggregator's outbound gradient filters, none by default.
    """

    def __init__(
        self,
        config: SplitUNetConfig,
        *,
        seed: int = 0,
        lr_site: float = 1e-4,
        lr_server: float = 1e-4,
        weight_decay: float = 1e-5,
        loss: LossKind | str = DEFAULT_LOSS,
        schedule: LrSchedule | str = LrSchedule.CONSTANT,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        site_filters: Callable[[str], FilterChain] | None = None,
        site_loss_terms: Sequence = (),
        gradient_filters: FilterChain | None = None,
    ) -> None:
        self.config = config
        common = dict(weight_decay=weight_decay, schedule=schedule, total_steps=total_steps,
                      warmup_steps=warmup_steps)
        self.site_options = OptimizerOptions(lr=lr_site, **common)
        self.server_options = OptimizerOptions(lr=lr_server, **common)
        self.model = make_split_unet(config, seed)
        self.sites = {
            name: SiteStep(
                enc, make_optimizer(enc.parameters(), lr=lr_site, weight_decay=weight_decay),
                site_filters(name) if site_filters is not None else None, site_loss_terms,
            )
            for name, enc in self.model.encoders.items()
        }
        self.aggregator = AggregatorStep(
            self.model.decoder,
            make_loss(loss),
            make_optimizer(self.model.decoder.parameters(), lr=lr_server, weight_decay=weight_decay),
            gradient_filters,
        )

    def train_step(self, images: torch.Tensor, regions: torch.Tensor, step: int,
                   sites: Sequence[str] | None = None) -> float:
        """One split step on a batch; returns the loss. ``sites``: the sites taking part (default all); the others
        are absent from the step (site dropout): not asked to forward, no gradient, no optimizer step."""
        present = list(self.sites) if sites is None else [n for n in self.sites if n in set(sites)]
        for name in present:
            set_lr(self.sites[name].optimizer, self.site_options.lr_at(step))
        set_lr(self.aggregator.optimizer, self.server_options.lr_at(step))
        inputs = self.model.split_inputs(images)
        sent = {name: self.sites[name].forward(inputs[name], step=step) for name in present}
        result = self.aggregator.step(sent, regions, step=step, sites=None if sites is None else present)
        for name in present:
            self.sites[name].backward(result.gradients[name], step=step)
        return result.loss

    def predict(self, images: torch.Tensor, sites: Sequence[str] | None = None) -> torch.Tensor:
        """Evaluation logits ``B, 3, *roi`` computed through the protocol (sites' eval forward, then decoder), from
        ``sites`` (default all; ``images`` still hold every modality, the absent ones are not read)."""
        inputs = self.model.split_inputs(images)
        present = list(self.sites) if sites is None else [n for n in self.sites if n in set(sites)]
        sent = {name: self.sites[name].forward(inputs[name], step=-1, train=False) for name in present}
        return self.aggregator.predict(sent, sites=None if sites is None else present)

    def predict_case(
        self, images: torch.Tensor, roi: Sequence[int], *, batch_size: int = 4, overlap: float = DEFAULT_OVERLAP,
        sites: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Logits ``(3, X, Y, Z)`` of a whole ``(C, X, Y, Z)`` volume by sliding windows of ``roi`` (2 or 3 sizes),
        from ``sites`` (default all)."""
        predict = self.predict if sites is None else (lambda x: self.predict(x, sites))
        return predict_volume(predict, images, roi, batch_size=batch_size, overlap=overlap)

    def evaluate(
        self, cases: Iterable[EvalCase], roi: Sequence[int], *, hd95: bool = False, batch_size: int = 4,
        overlap: float = DEFAULT_OVERLAP, sites: Sequence[str] | None = None,
    ) -> dict:
        """Dice (and HD95 in mm) per case over whole volumes, and their mean and median (see
        :meth:`splitunet.metrics.RegionMetrics.aggregate`), from ``sites`` (default all)."""
        metrics = RegionMetrics(hd95=hd95)
        for case in cases:
            logits = self.predict_case(case.images, roi, batch_size=batch_size, overlap=overlap, sites=sites)
            metrics.add_case(case.case_id, logits, case.regions, case.spacing)
        return metrics.aggregate()


@dataclass
class TrainingHistory:
    """Losses per step, validation results per validation step, and wall-clock seconds."""

    losses: list[float] = field(default_factory=list)
    validations: list[tuple[int, dict]] = field(default_factory=list)
    seconds: float = 0.0


def train_in_process(
    federation: InProcessFederation,
    next_batch: Callable[[int], Batch],
    *,
    steps: int,
    validation: Callable[[], Iterable[EvalCase]] | None = None,
    val_roi: Sequence[int] | None = None,
    val_interval: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingHistory:
    """Train for ``steps`` steps; ``next_batch(step)`` gives a batch, ``validation()`` the held-out cases.

    Validates every ``val_interval`` steps (0: only at the end, if ``validation`` is given) with windows of
    ``val_roi``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if validation is not None and val_roi is None:
        raise ValueError("validation needs val_roi (the sliding-window size)")
    history = TrainingHistory()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, regions = next_batch(step)
        loss = federation.train_step(images, regions, step)
        history.losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
        due = val_interval > 0 and step % val_interval == 0
        if validation is not None and (due or step == steps):
            result = federation.evaluate(validation(), val_roi)
            history.validations.append((step, result))
            logger.info("step %d: validation %s", step, result["dice"])
    history.seconds = time.perf_counter() - start
    return history
