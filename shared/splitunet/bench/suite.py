"""``splitunet bench``: every performance figure of the project against its limit, measured in one run.

- ``p1_wire_efficiency``: a bundle over HTTP to a service vs the same bytes over raw loopback TCP
  (:mod:`splitunet.bench.wire_throughput`).
- ``p2_split_overhead``: median step time over HTTP / the same step in process, at cut levels 0 and 2, 2D and 3D
  (:mod:`splitunet.bench.split_step`); the in-process reference is the faster of 1 torch thread and all cores.
- ``p2_split_overhead_delayed``: the same ratio with the one-step-delayed (pipelined) schedule over HTTP
  (``"step_schedule": "delayed"``; :mod:`services.aggregator.pipeline`) against the same synchronous in-process
  reference: what overlapping the exchange with the next forward buys. Its effect on Dice is
  ``python -m splitunet.bench.delayed``'s to measure (it needs a trained model).
- ``p3_bytes_ratio``: bundle bytes per step on the wire / analytic tensor bytes (:mod:`splitunet.planner`, fp16
  activations + fp32 gradients); the worst of all configurations measured (P2 and scaling).
- ``scaling``: step time, bytes and samples/s for K = 2, 4, 8 sites and for three ROI sizes.
- peak RSS per service, phantom generation seconds per case, white-box inversion seconds per slice.

All services of the federation are started once and run every job (their peak RSS is the peak over all jobs).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitunet.bench.split_step import HttpFederation, StepCase, codec_seconds, in_process_steps

logger = logging.getLogger(__name__)

#: Targets of issue 14 (ratios).
#: The job-spec change of the delayed-schedule rows.
DELAYED = {"step_schedule": "delayed"}
TARGETS = {"p1_wire_efficiency": ">= 0.8", "p2_cut2": "<= 1.10", "p2_cut0": "<= 1.30", "p3_bytes_ratio": "<= 1.02"}


@dataclass(frozen=True)
class BenchPlan:
    """Sizes of one benchmark run (``full()`` or ``quick()``)."""

    steps: int
    warmup: int
    wire_megabytes: float
    wire_iterations: int
    cohort_cases: int
    cohort_shape: tuple[int, int, int]
    roi_2d: tuple[int, int]
    roi_3d: tuple[int, int, int]
    batch_2d: int
    batch_3d: int
    features_2d: tuple[int, ...]
    features_3d: tuple[int, ...]
    site_counts: tuple[int, ...]
    scaling_rois_2d: tuple[tuple[int, int], ...]
    scaling_rois_3d: tuple[tuple[int, int, int], ...]
    phantom_cases: int
    phantom_shape: tuple[int, int, int]
    whitebox_iterations: int
    whitebox_size: int

    @classmethod
    def full(cls) -> BenchPlan:
        return cls(steps=12, warmup=4, wire_megabytes=64.0, wire_iterations=5, cohort_cases=5,
                   cohort_shape=(128, 128, 80), roi_2d=(128, 128), roi_3d=(64, 64, 64), batch_2d=8, batch_3d=1,
                   features_2d=(8, 16, 32, 64), features_3d=(8, 16, 32, 64), site_counts=(2, 4, 8),
                   scaling_rois_2d=((64, 64), (96, 96), (128, 128)), scaling_rois_3d=((32, 32, 32), (48, 48, 48),
                                                                                     (64, 64, 64)),
                   phantom_cases=2, phantom_shape=(240, 240, 155), whitebox_iterations=200, whitebox_size=128)

    @classmethod
    def quick(cls) -> BenchPlan:
        """A smoke configuration: every figure is produced, none means much."""
        return cls(steps=2, warmup=1, wire_megabytes=2.0, wire_iterations=2, cohort_cases=3,
                   cohort_shape=(32, 32, 24), roi_2d=(16, 16), roi_3d=(16, 16, 16), batch_2d=2, batch_3d=1,
                   features_2d=(4, 8, 16), features_3d=(4, 8, 16), site_counts=(2, 4),
                   scaling_rois_2d=((16, 16), (24, 24)), scaling_rois_3d=((16, 16, 16), (24, 24, 24)),
                   phantom_cases=1, phantom_shape=(32, 32, 24), whitebox_iterations=2, whitebox_size=32)


def _http_case(http: HttpFederation, case: StepCase, plan: BenchPlan) -> dict:
    times, status = http.run(case, plan.steps, plan.warmup)
    wire = (status["bytes_sent"] + status["bytes_received"]) / status["step"]
    analytic = case.analytic_bytes()
    return {
        "config": case.label, "dims": case.dims, "cut_level": case.cut_level, "roi": list(case.roi),
        "sites": case.sites, "batch": case.batch, "features": list(case.features),
        "http_step_s": times.median_s, "http_steps_s": times.steps, "phases_s": times.phases,
        "samples_per_s": case.batch / times.median_s, "wire_bytes_per_step": wire,
        "analytic_bytes_per_step": analytic, "bytes_ratio": wire / analytic,
        "codec_per_site_s": codec_seconds(case),
    }


def run_bench(plan: BenchPlan, *, dims: tuple[int, ...] = (2, 3), device: str = "cpu",
              progress: Callable[[str], None] = logger.info) -> dict:
    """Measure every figure; return the JSON document (see the module docstring)."""
    import torch

    from splitunet.bench.audit_speed import whitebox_seconds
    from splitunet.bench.machine import machine_info, usable_cores
    from splitunet.bench.phantom_speed import time_cases
    from splitunet.bench.wire_throughput import measure_wire
    from splitunet.data.partition import partition_cohort
    from splitunet.data.phantom import write_cohort
    from splitunet.launcher import thread_budget

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked but torch sees no CUDA device; use --device cpu")
    cores = usable_cores()
    doc: dict = {"quick": plan == BenchPlan.quick(), "plan": plan.__dict__, "targets": TARGETS, "device": device}
    started = time.perf_counter()

    progress(f"P1: {plan.wire_megabytes:g} MiB bundles over HTTP vs raw TCP")
    wire = measure_wire(plan.wire_megabytes, plan.wire_iterations, threads=1)
    doc["p1_wire_efficiency"] = wire.efficiency
    doc["wire"] = wire.to_dict()

    def case(d: int, cut: int, k: int = 4, roi: tuple[int, ...] | None = None) -> StepCase:
        return StepCase(dims=d, cut_level=cut, roi=roi or (plan.roi_2d if d == 2 else plan.roi_3d), sites=k,
                        batch=plan.batch_2d if d == 2 else plan.batch_3d,
                        features=plan.features_2d if d == 2 else plan.features_3d)

    max_sites = max(plan.site_counts)
    site_threads, agg_threads = thread_budget(4, cores)
    doc["services"] = {"sites_started": max_sites, "site_torch_threads": site_threads,
                       "aggregator_torch_threads": agg_threads,
                       "in_process_torch_threads": sorted({1, cores})}
    with tempfile.TemporaryDirectory(prefix="splitunet-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_cohort(root / "cohort", plan.cohort_cases, seed=0, shape=plan.cohort_shape)
        doc["cohort"] = {"cases": plan.cohort_cases, "shape": list(plan.cohort_shape),
                         "write_s": time.perf_counter() - t0}
        parts = partition_cohort(root / "cohort", root / "parts")
        p2: dict = {}
        p2_delayed: dict = {}
        runs: list[dict] = []
        with HttpFederation(root / "fed", parts, max_sites=max_sites, site_threads=site_threads,
                            aggregator_threads=agg_threads, device=device) as http:
            for d in dims:
                for cut in (0, 2):
                    c = case(d, cut)
                    progress(f"P2/P3: {c.label} over HTTP")
                    row = _http_case(http, c, plan)
                    # the reference is the faster of 1 thread and all cores: on a loaded machine, torch's
                    # intra-op threads wait on each other and 2 threads can be several times slower than 1
                    by_threads = {}
                    for threads in sorted({1, cores}):
                        progress(f"P2: {c.label} in process, {threads} torch thread(s)")
                        by_threads[threads] = in_process_steps(c, root / "cohort", plan.steps, plan.warmup,
                                                               device=device, threads=threads)
                    best = min(by_threads, key=lambda t: by_threads[t].median_s)
                    local = by_threads[best]
                    row |= {"in_process_step_s": local.median_s, "in_process_steps_s": local.steps,
                            "in_process_phases_s": local.phases, "in_process_threads": best,
                            "in_process_by_threads": {t: {"step_s": v.median_s, "steps_s": v.steps,
                                                          "phases_s": v.phases} for t, v in by_threads.items()},
                            "overhead": row["http_step_s"] / local.median_s}
                    p2[f"cut{cut}_{d}d"] = row["overhead"]
                    progress(f"P2: {c.label} over HTTP, delayed schedule")
                    delayed, _ = http.run(c, plan.steps, plan.warmup, spec=c.spec(plan.steps) | DELAYED)
                    row |= {"http_delayed_step_s": delayed.median_s, "http_delayed_steps_s": delayed.steps,
                            "delayed_phases_s": delayed.phases,
                            "overhead_delayed": delayed.median_s / local.median_s}
                    p2_delayed[f"cut{cut}_{d}d"] = row["overhead_delayed"]
                    runs.append(row)
            scaling: dict = {"sites": [], "roi": []}
            d = dims[0]
            base = next(r for r in runs if r["dims"] == d and r["cut_level"] == 0)
            for k in plan.site_counts:
                if k == 4:
                    scaling["sites"].append(base)
                    continue
                progress(f"scaling: K={k}")
                scaling["sites"].append(_http_case(http, case(d, 0, k=k), plan))
            for roi in plan.scaling_rois_2d if d == 2 else plan.scaling_rois_3d:
                if tuple(roi) == tuple(base["roi"]):
                    scaling["roi"].append(base)
                    continue
                progress(f"scaling: roi {roi}")
                scaling["roi"].append(_http_case(http, case(d, 0, roi=roi), plan))
            doc["peak_rss_bytes"] = http.peak_rss()
    doc["runs"] = runs
    doc["p2_split_overhead"] = {key: p2.get(key) for key in ("cut0_2d", "cut2_2d", "cut0_3d", "cut2_3d")}
    doc["p2_split_overhead_delayed"] = {key: p2_delayed.get(key) for key in ("cut0_2d", "cut2_2d", "cut0_3d",
                                                                              "cut2_3d")}
    doc["p3_bytes_ratio"] = max(r["bytes_ratio"] for r in [*runs, *scaling["sites"], *scaling["roi"]])
    doc["scaling"] = scaling
    doc["throughput_samples_per_s"] = {r["config"]: r["samples_per_s"] for r in runs}

    progress(f"phantom generation: {plan.phantom_cases} case(s) of {plan.phantom_shape}")
    torch.set_num_threads(1)
    phantom = time_cases(plan.phantom_cases, plan.phantom_shape)
    phantom["seconds_per_case"] = statistics.median(
        g + w for g, w in zip(phantom["generate_s"], phantom["write_s"], strict=True))
    doc["phantom"] = phantom
    progress(f"white-box inversion: {plan.whitebox_iterations} iterations, {plan.whitebox_size}^2 slice")
    torch.set_num_threads(cores)
    doc["whitebox_inversion"] = whitebox_seconds(plan.whitebox_iterations, plan.whitebox_size)
    doc["machine"] = machine_info(device)
    doc["total_s"] = time.perf_counter() - started
    return doc
