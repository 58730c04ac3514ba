"""Sync vs one-step-delayed schedule over HTTP: median step time and final Dice of each, in one run.

``python -m splitunet.bench.delayed [--steps N] [--json FILE]`` starts one local federation (four site processes
and an aggregator, torch threads from :func:`splitunet.launcher.thread_budget`) on the quick 2D demo's phantom
cohort (cached like the demo's) and runs the quick 2D demo's job twice, ``step_schedule = sync`` then
``delayed``, with the same seed and samples; each job validates once, at its last step (whole validation cases,
sliding windows, as the demo). Printed, never asserted: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: The schedules compared, in the order they run.
SCHEDULES = ("sync", "delayed")


def demo_job(steps: int) -> tuple[dict, object]:
    """The quick 2D demo's job spec (without sites and validation cases) with ``steps``, and its options."""
    from splitunet.demo import DemoOptions, training_plan

    options = DemoOptions(workdir=Path("unused"), quick=True, dims=2, steps=steps)
    plan = training_plan(options)
    plan["val_interval"] = 0  # validate once, at the end
    return plan, options


def compare(steps: int, warmup: int, workdir: Path) -> dict:
    """Run the demo job under each schedule on one federation; return the figures (JSON-able)."""
    from splitunet.bench.machine import machine_info, usable_cores
    from splitunet.bench.split_step import HttpFederation, StepCase, after_warmup
    from splitunet.data.layout import discover_cases
    from splitunet.data.partition import partition_cohort
    from splitunet.demo import VAL_CASES, phantom_cohort
    from splitunet.launcher import thread_budget

    plan, options = demo_job(steps)
    source = phantom_cohort(options)
    n_cases = len(discover_cases(source))
    n_val = max(1, min(VAL_CASES, n_cases // 3))
    parts = partition_cohort(source, workdir / "parts", val_fraction=n_val / n_cases, seed=options.seed)
    model = plan["model"]
    case = StepCase(dims=2, cut_level=model["cut_level"], roi=tuple(plan["roi"]), sites=4,
                    batch=plan["batch_size"], features=tuple(model["features"]))
    site_threads, agg_threads = thread_budget(4, usable_cores())
    doc: dict = {"steps": steps, "warmup": warmup, "job": plan, "config": case.label,
                 "load_average_start": os.getloadavg()[0], "schedules": {}}
    with HttpFederation(workdir / "fed", parts, max_sites=4, site_threads=site_threads,
                        aggregator_threads=agg_threads) as http:
        for schedule in SCHEDULES:
            logger.info("%s: %d steps of %s", schedule, steps, case.label)
            spec = plan | {"val_cases": list(parts.validation), "step_schedule": schedule}
            times, status = http.run(case, steps, warmup, spec=spec)
            kept = after_warmup(status["step_times"], warmup)
            doc["schedules"][schedule] = {
                "median_step_s": times.median_s, "phases_s": times.phases,
                "train_s": status["timing"].get("train_s"), "validation_s": status["timing"].get("validation_s"),
                "final_loss": status["loss"], "dice": status["validation"]["dice"],
                "mean_loss_last_20": statistics.fmean(status["losses"][-20:]),
                "steps_timed": len(kept),
            }
    sync, delayed = (doc["schedules"][s] for s in SCHEDULES)
    doc["speedup"] = sync["median_step_s"] / delayed["median_step_s"]
    doc["load_average_end"] = os.getloadavg()[0]
    doc["machine"] = machine_info()
    doc["services"] = {"site_torch_threads": site_threads, "aggregator_torch_threads": agg_threads}
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per job (the quick demo's 200)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every status poll
    with tempfile.TemporaryDirectory(prefix="splitunet-delayed-") as tmp:
        doc = compare(args.steps, args.warmup, Path(tmp))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
    m = doc["machine"]
    print(f"{doc['config']}, {doc['steps']} steps (median after {doc['warmup']}), on {m['cpu_model']}, "
          f"{m['cores']} cores, load average {doc['load_average_start']:.1f} -> {doc['load_average_end']:.1f}")
    print(f"{'schedule':<9} {'step s':>7} {'plan':>6} {'fwd':>6} {'agg':>6} {'bwd':>6} {'loss':>6}  Dice TC/WT/ET")
    for name, r in doc["schedules"].items():
        p, d = r["phases_s"], r["dice"]
        print(f"{name:<9} {r['median_step_s']:7.3f} {p['plan']:6.3f} {p['forward']:6.3f} {p['aggregator']:6.3f} "
              f"{p['backward']:6.3f} {r['mean_loss_last_20']:6.3f}  {d['TC']:.3f}/{d['WT']:.3f}/{d['ET']:.3f}")
    print(f"sync / delayed median step time: {doc['speedup']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
