"""P2, P3 and scaling: split training steps over HTTP (real site and aggregator processes) and in process.

Both paths train the same model (same configuration, sites and seed) on the same phantom cohort with the same batch
size, and time the same work per step: sample planning (cases, crops, flips from the labels), extraction of the
images and labels, the sites' forwards, the decoder step and the sites' backwards. The statistic is the median of
the steps after ``warmup`` on both paths.

- **HTTP**: site processes and one aggregator process (:class:`splitunet.launcher.LocalFederation`), a job posted
  to the aggregator's REST API; the per-step times come from the job's own ``step_times`` (wall seconds per step:
  plan, forward calls, aggregator step, backward sends).
- **in process**: :class:`splitunet.training.InProcessFederation` with as many torch threads as the cores the
  services share.

Sites beyond the four BraTS modalities hold a modality again (site ``t1-2`` holds ``t1``): the config allows a
modality at several sites, so K = 8 is eight real site processes with the cost of eight encoders.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitunet.config import MODALITIES

logger = logging.getLogger(__name__)

#: Job states after which a job does not change any more.
FINAL_STATES = ("succeeded", "failed", "stopped")


def site_names(k: int) -> list[tuple[str, str]]:
    """``(site name, modality)`` of K sites: the four modalities, then again with a suffix (``t1-2``, ...)."""
    if k < 1:
        raise ValueError(f"the number of sites must be >= 1, got {k}")
    out = []
    for i in range(k):
        modality = MODALITIES[i % len(MODALITIES)]
        out.append((modality if i < len(MODALITIES) else f"{modality}-{i // len(MODALITIES) + 1}", modality))
    return out


@dataclass(frozen=True)
class StepCase:
    """One benchmarked configuration: spatial dims, cut level, ROI, number of sites, batch and widths."""

    dims: int
    cut_level: int
    roi: tuple[int, ...]
    sites: int
    batch: int
    features: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.roi) != self.dims:
            raise ValueError(f"roi {self.roi} must have {self.dims} sizes for a {self.dims}D model")

    @property
    def label(self) -> str:
        roi = "x".join(str(r) for r in self.roi)
        return f"{self.dims}D cut {self.cut_level} roi {roi} K={self.sites} batch {self.batch}"

    def spec(self, steps: int, seed: int = 0) -> dict:
        """The job spec (JSON) for the aggregator; validation runs once at the end, outside the step timer."""
        return {
            "sites": [name for name, _ in site_names(self.sites)],
            "model": {"spatial_dims": self.dims, "features": list(self.features), "cut_level": self.cut_level},
            "roi": list(self.roi), "batch_size": self.batch, "steps": steps, "seed": seed,
            "val_cases": 1, "val_interval": 0, "max_val_cases": 1, "sw_overlap": 0.0, "loss": "dice_ce",
        }

    def analytic_bytes(self) -> int:
        """Tensor bytes per step from :mod:`splitunet.planner`: fp16 activations + fp32 gradients, all sites."""
        from splitunet.federation import FederationSpec
        from splitunet.planner import plan_cut

        config = FederationSpec.model_validate(self.spec(1)).model.build(self.site_specs())
        plan = plan_cut(config, self.roi, self.batch)
        return self.sites * (plan.forward_bytes_per_site["fp16"] + plan.backward_bytes_per_site["fp32"])

    def site_specs(self):
        from splitunet.config import SiteSpec

        return tuple(SiteSpec(name=name, modalities=(m,)) for name, m in site_names(self.sites))


@dataclass
class StepTimes:
    """Wall seconds per step (after warm-up) and their medians; phases where the path reports them."""

    steps: list[float]
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.steps)


def after_warmup(values: Sequence[float], warmup: int) -> list[float]:
    """The values after the first ``warmup`` (all of them if fewer would be left than one)."""
    rest = list(values[warmup:])
    return rest or list(values)


class HttpFederation:
    """A local federation of ``max_sites`` site processes and one aggregator for benchmark jobs.

    Args:
        workdir: logs, tokens and state of the processes.
        parts: the partitioned cohort (:func:`splitunet.data.partition.partition_cohort`).
        max_sites: sites started (jobs use the first K of them).
        site_threads, aggregator_threads: torch intra-op threads per process.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, workdir: Path, parts, *, max_sites: int, site_threads: int, aggregator_threads: int,
                 device: str = "cpu") -> None:
        from splitunet.launcher import LocalFederation

        self.fed = LocalFederation(workdir, torch_threads=site_threads)
        self.parts, self.max_sites, self.device = parts, max_sites, device
        self.aggregator_threads = aggregator_threads
        self.aggregator = None

    def __enter__(self) -> HttpFederation:
        try:
            for name, modality in site_names(self.max_sites):
                self.fed.start_site(name, [modality], self.parts.site_dir(modality), seed=0, device=self.device)
            self.aggregator = self.fed.start_aggregator(
                self.parts.aggregator_dir, device=self.device, torch_threads=self.aggregator_threads,
                env={"AGG_TRANSCRIPT__ENABLED": "false"},
            )
            self.fed.wait_ready(timeout_s=300)
        except BaseException:
            self.fed.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.fed.stop()

    def run(self, case: StepCase, steps: int, warmup: int, poll_s: float = 0.2,
            spec: dict | None = None) -> tuple[StepTimes, dict]:
        """Run one job of ``case`` (or ``spec``, a job spec without sites, for ``case``'s sites); return its step
        times after warm-up (with median phases) and its status."""
        import httpx

        if case.sites > self.max_sites:
            raise ValueError(f"{case.sites} sites asked, {self.max_sites} started")
        assert self.aggregator is not None
        with httpx.Client(base_url=self.aggregator.url, headers=self.fed.operator_headers(), timeout=60) as client:
            body = case.spec(steps) if spec is None else spec | {"sites": case.spec(steps)["sites"], "steps": steps}
            job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["job_id"]
            while (status := client.get(f"/v1/jobs/{job_id}").raise_for_status().json())["state"] not in FINAL_STATES:
                time.sleep(poll_s)
        if status["state"] != "succeeded":
            raise RuntimeError(f"benchmark job {case.label} {status['state']}: {status.get('error')}\n"
                               f"{self.aggregator.log_tail()}")
        records = after_warmup(status["step_times"], warmup)
        phases = {k: statistics.median(r[k] for r in records) for k in records[0] if k not in ("step", "total")}
        return StepTimes(steps=[r["total"] for r in records], phases=phases), status

    def peak_rss(self) -> dict[str, int | None]:
        """Peak resident memory (``VmHWM``) of every service process so far, bytes."""
        from splitunet.bench.machine import peak_rss_bytes

        return {p.name: peak_rss_bytes(p.process.pid) for p in self.fed.processes}


def _plan(case: StepCase, spec, rng: np.random.Generator, train: Sequence[str], regions: Callable[[str], np.ndarray],
          brain_z: Callable[[str], tuple[int, int] | None]):
    """The samples of one step, drawn as the aggregator's job draws them (``TrainingJob.plan``)."""
    from splitunet.data.grid import brain_slices
    from splitunet.data.sampling import plan_patches, plan_slices

    samples = []
    for case_id in rng.choice(train, size=spec.batch_size, replace=True):
        r = regions(str(case_id))
        foreground = r[1] if spec.fg_ratio > 0 else None
        if case.dims == 3:
            samples += plan_patches(str(case_id), r.shape[1:], spec.roi, 1, rng, foreground=foreground,
                                    fg_ratio=spec.fg_ratio, flip_prob=spec.flip_prob)
        else:
            samples += plan_slices(str(case_id), r.shape[1:], spec.roi, 1, rng, foreground=foreground,
                                   fg_ratio=spec.fg_ratio, flip_prob=spec.flip_prob, resize=spec.resize_slices,
                                   allowed_slices=brain_slices(brain_z(str(case_id))))
    return samples


def in_process_steps(case: StepCase, cohort: Path, steps: int, warmup: int, *, device: str = "cpu",
                     threads: int = 1) -> StepTimes:
    """The same steps through :class:`~splitunet.training.InProcessFederation`: planning, extraction (images
    and labels, from arrays already in memory, as the services cache them) and the step inside the timer."""
    import torch

    from splitunet.data.grid import case_grid
    from splitunet.data.layout import discover_cases
    from splitunet.data.loader import load_images, load_regions
    from splitunet.data.sampling import extract
    from splitunet.federation import FederationSpec
    from splitunet.training import InProcessFederation

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        spec = FederationSpec.model_validate(case.spec(steps))
        config = spec.model.build(case.site_specs())
        federation = InProcessFederation(config, seed=spec.seed, loss=spec.loss)
        federation.model.to(device)
        cases = discover_cases(cohort)
        images = {c: load_images(v, config.modalities).array for c, v in cases.items()}
        labels = {c: load_regions(v) for c, v in cases.items()}
        extents = {c: case_grid(v, config.modalities).brain_z for c, v in cases.items()}
        train = sorted(cases)[1:]  # one validation case held out, as in the HTTP job
        rng = np.random.default_rng(spec.seed)
        times, phases = [], []

        def now() -> float:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter()

        for step in range(1, steps + 1):  # InProcessFederation.train_step, timed per phase
            t0 = now()
            samples = _plan(case, spec, rng, train, labels.__getitem__, extents.__getitem__)
            x = torch.from_numpy(np.stack([extract(images[s.case_id], s) for s in samples])).to(device)
            y = np.stack([extract(labels[s.case_id], s, interpolation="nearest") for s in samples])
            regions = torch.from_numpy(y.astype(np.float32)).to(device)
            t1 = now()
            inputs = federation.model.split_inputs(x)
            sent = {name: site.forward(inputs[name], step=step) for name, site in federation.sites.items()}
            t2 = now()
            result = federation.aggregator.step(sent, regions, step=step)
            t3 = now()
            for name, site in federation.sites.items():
                site.backward(result.gradients[name], step=step)
            t4 = now()
            times.append(t4 - t0)
            phases.append({"plan": t1 - t0, "forward": t2 - t1, "aggregator": t3 - t2, "backward": t4 - t3})
        kept = after_warmup(phases, warmup)
        medians = {k: statistics.median(p[k] for p in kept) for k in kept[0]}
    finally:
        torch.set_num_threads(previous)
    return StepTimes(steps=after_warmup(times, warmup), phases=medians)


def codec_seconds(case: StepCase, repeats: int = 3) -> dict[str, float]:
    """Median seconds to encode and decode one site's bundles of ``case`` in this process: activations (fp16)
    and gradients (fp32), checksum and checks included; the codec share of the forward and backward phases."""
    import torch

    from splitunet.federation import FederationSpec
    from splitunet.protocol import expected_site_shapes
    from splitunet.wire import BundleKind, BundleMeta, WireDtype, decode_bundle, encode_bundle

    config = FederationSpec.model_validate(case.spec(1)).model.build(case.site_specs())
    shapes = expected_site_shapes(config, case.batch, case.roi)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(*v, generator=gen) for k, v in shapes.items()}
    out: dict[str, float] = {}
    for kind, dtype in ((BundleKind.ACTIVATIONS, WireDtype.FP16), (BundleKind.GRADIENTS, WireDtype.FP32)):
        meta = BundleMeta(run_id="bench", step=1, site=case.site_specs()[0].name, kind=kind)
        enc, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = encode_bundle(tensors, meta=meta, dtype=dtype, max_bytes=2**34)
            t1 = time.perf_counter()
            decode_bundle(data, max_bytes=2**34)
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        out[f"{kind.value}_encode_s"] = statistics.median(enc)
        out[f"{kind.value}_decode_s"] = statistics.median(dec)
    return out
