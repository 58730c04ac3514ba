"""The bounded worst case: each allocating route at its memory limit, peak RSS against the documented bound.

``python -m splitunet.bench.hostile`` starts a local federation (2 site processes and the aggregator, real
``splitunet serve`` processes on 127.0.0.1) over a small phantom cohort, with explicit memory bounds
(``SITE_MAX_FORWARD_BYTES``, ``AGG_MAX_STEP_BYTES``; docs/limits.md), and then:

1. runs a training job whose every step is sized just under both bounds by the memory model
   (:mod:`splitunet.memory`): the sites' train forwards and backwards, the aggregator's decoder steps and its
   validation window batches all run at the limit;
2. posts a job twice over the aggregator's bound (refused with 413 before anything is built);
3. runs ``--failed-jobs`` jobs that fail at once (an unknown validation case) and reports what the aggregator
   keeps per finished job.

Before them a one-sample, one-step job warms every process up (what a process allocates once: torch's kernels
and thread pools, the PSI, the image cache). For each process it prints the peak RSS (``VmHWM``) growth over
its RSS once warm (``VmRSS``) against the bound the docs state for a request's work; a line ends ``within`` or
``OVER``. The figures depend
on the machine and its load (the allocator's behaviour, torch's thread pools): quote them as measured there.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import httpx

from splitunet.config import SiteSpec
from splitunet.federation import FederationSpec
from splitunet.memory import aggregator_step_bytes, encoder_weight_bytes, site_forward_bytes

logger = logging.getLogger(__name__)

SITES = ("t1", "flair")
FINAL = ("succeeded", "failed", "stopped")


def proc_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def sized_job(site_bound: int, agg_bound: int, roi: int, features: tuple[int, ...]) -> tuple[dict, dict]:
    """A job spec whose step is the largest batch under both bounds; and the figures of its model."""
    spec = {"run_id": "at-the-limit", "sites": list(SITES), "roi": [roi, roi], "steps": 3, "val_cases": 1,
            "model": {"spatial_dims": 2, "features": list(features), "cut_level": 0}, "seed": 1,
            "wire": {"activations": "fp32", "gradients": "fp32"}}
    config = FederationSpec.model_validate({**spec, "batch_size": 1}).model.build(
        tuple(SiteSpec(name=s, modalities=(s,)) for s in SITES))
    voxels = roi * roi
    per_site = site_forward_bytes(config, voxels, train=True)
    per_agg = aggregator_step_bytes(config, voxels) - aggregator_step_bytes(config, 0)
    site_fixed = encoder_weight_bytes(config, SITES[0])
    agg_fixed = aggregator_step_bytes(config, 0)
    batch = min((site_bound - site_fixed) // per_site, (agg_bound - agg_fixed) // per_agg, 256)
    if batch < 1:
        raise SystemExit("the bounds are too small for one sample of this model; raise --site-bound/--agg-bound")
    spec["batch_size"] = int(batch)
    figures = {"batch": int(batch), "site_bytes": int(batch * per_site + site_fixed),
               "agg_bytes": int(batch * per_agg + agg_fixed)}
    return spec, figures


def wait(client: httpx.Client, job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := client.get(f"/v1/jobs/{job_id}").raise_for_status().json())["state"] not in FINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status['state']} after {timeout_s:.0f} s")
        time.sleep(0.2)
    return status


def run(workdir: Path, *, site_bound: int, agg_bound: int, roi: int, failed_jobs: int) -> int:
    from splitunet.data.partition import partition_cohort
    from splitunet.data.phantom import write_cohort
    from splitunet.launcher import LocalFederation

    write_cohort(workdir / "cohort", 4, shape=(roi, roi, 24), compress=False)
    parts = partition_cohort(workdir / "cohort", workdir / "parts")
    spec, model = sized_job(site_bound, agg_bound, roi, (16, 32, 64, 128))
    print(f"job at the limit: batch {model['batch']} x {roi}x{roi}, features 16-32-64-128, cut 0, "
          f"{len(SITES)} sites; memory model: site {model['site_bytes'] / 2**20:.0f} MiB of "
          f"{site_bound / 2**20:.0f}, aggregator {model['agg_bytes'] / 2**20:.0f} MiB of {agg_bound / 2**20:.0f}")
    over = 0
    with LocalFederation(workdir / "fed", torch_threads=1) as fed:
        site_env = {"SITE_MAX_FORWARD_BYTES": str(site_bound), "SITE_LOG_LEVEL": "warning"}
        sites = {s: fed.start_site(s, [s], parts.site_dir(s), env=site_env) for s in SITES}
        aggregator = fed.start_aggregator(parts.aggregator_dir, env={
            "AGG_MAX_STEP_BYTES": str(agg_bound), "AGG_TRANSCRIPT__ENABLED": "false", "AGG_LOG_LEVEL": "warning"})
        fed.wait_ready(timeout_s=300)
        procs = {f"site {s}": p for s, p in sites.items()} | {"aggregator": aggregator}
        started = {name: proc_kib(p.process.pid, "VmRSS") for name, p in procs.items()}
        with httpx.Client(base_url=aggregator.url, headers=fed.operator_headers(), timeout=60) as client:
            # warm-up: one step of one sample loads what a process loads once (kernels, pools, caches, PSI)
            warm = dict(spec, run_id="warm-up", batch_size=1, steps=1)
            wait(client, client.post("/v1/jobs", json=warm).raise_for_status().json()["job_id"], timeout_s=600)
        ready = {name: proc_kib(p.process.pid, "VmRSS") for name, p in procs.items()}
        start_hwm = {name: proc_kib(p.process.pid, "VmHWM") for name, p in procs.items()}
        with httpx.Client(base_url=aggregator.url, headers=fed.operator_headers(), timeout=60) as client:
            too_big = dict(spec, run_id="twice-the-limit", batch_size=min(256, 2 * spec["batch_size"] + 1))
            refused = client.post("/v1/jobs", json=too_big)
            print(f"job over the bound: HTTP {refused.status_code} {refused.json().get('code')}")
            created = client.post("/v1/jobs", json=spec).raise_for_status().json()
            status = wait(client, created["job_id"], timeout_s=1800)
            print(f"job at the limit: {status['state']} after {status['step']} steps "
                  f"({status.get('error') or 'no error'})")
        bounds = {f"site {s}": site_bound for s in SITES} | {"aggregator": agg_bound}
        modelled = {f"site {s}": model["site_bytes"] for s in SITES} | {"aggregator": model["agg_bytes"]}
        print(f"{'process':<12} {'RSS started':>11} {'RSS warm':>9} {'peak warm':>10} {'peak after':>11} "
              f"{'growth':>9} {'model':>9} {'bound':>9}")
        for name, proc in procs.items():
            peak = proc_kib(proc.process.pid, "VmHWM")
            growth = max(0, peak - ready[name]) * 1024
            verdict = "within" if growth <= bounds[name] else "OVER"
            over += verdict == "OVER"
            print(f"{name:<12} {started[name] / 1024:>9.0f}Mi {ready[name] / 1024:>7.0f}Mi "
                  f"{start_hwm[name] / 1024:>8.0f}Mi "
                  f"{peak / 1024:>9.0f}Mi {growth / 2**20:>7.0f}Mi {modelled[name] / 2**20:>7.0f}Mi "
                  f"{bounds[name] / 2**20:>7.0f}Mi  {verdict}")
        if failed_jobs:
            with httpx.Client(base_url=aggregator.url, headers=fed.operator_headers(), timeout=60) as client:
                before = proc_kib(aggregator.process.pid, "VmRSS")
                for i in range(failed_jobs):
                    bad = dict(spec, run_id=f"fails-{i}", batch_size=1, val_cases=["no-such-case"])
                    wait(client, client.post("/v1/jobs", json=bad).raise_for_status().json()["job_id"], 120)
                after = proc_kib(aggregator.process.pid, "VmRSS")
            print(f"{failed_jobs} failed jobs: aggregator RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB "
                  f"({(after - before) / failed_jobs:.0f} KiB per finished job)")
    return over


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site-bound", type=int, default=256 * 2**20, help="SITE_MAX_FORWARD_BYTES (bytes)")
    parser.add_argument("--agg-bound", type=int, default=1024 * 2**20, help="AGG_MAX_STEP_BYTES (bytes)")
    parser.add_argument("--roi", type=int, default=128, help="in-plane size of the 2D samples (phantom too)")
    parser.add_argument("--failed-jobs", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        workdir = args.workdir or Path(tmp)
        over = run(workdir, site_bound=args.site_bound, agg_bound=args.agg_bound, roi=args.roi,
                   failed_jobs=args.failed_jobs)
    raise SystemExit(1 if over else 0)


if __name__ == "__main__":
    main()
