"""Benchmark: the demo's in-process baselines, seconds per phase (batch loading, training steps, evaluation).

Run ``python -m splitunet.bench.baselines_speed [--threads 2] [--steps 50] [--dims 2] [--default] [--profile 25]``.
It trains the centralized and the four single-modality U-Nets of ``splitunet demo --quick`` (``--default``: of
``splitunet demo``; same plan, same cached phantom cohort, generated once if missing) for ``--steps`` steps and
evaluates them on 4 held-out cases, then prints milliseconds per step per model, seconds of evaluation per model
and of batch loading. ``--profile N`` also prints the N most expensive functions (cProfile, cumulative time).
Results go to stdout: this is a command-line program.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train and evaluate the baselines once, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m splitunet.bench.baselines_speed", description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--default", action="store_true", help="the default demo's plan instead of --quick's")
    parser.add_argument("--profile", type=int, default=0, help="print the N most expensive functions")
    args = parser.parse_args(argv)

    import torch

    from splitunet.baseline_training import train_baselines
    from splitunet.data.layout import discover_cases
    from splitunet.demo import VAL_CASES, DemoOptions, phantom_cohort, training_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        options = DemoOptions(workdir=Path(tmp), quick=not args.default, dims=args.dims)
        source = phantom_cohort(options)
        ids = sorted(discover_cases(source))
        plan = training_plan(replace(options, steps=args.steps))
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        results = train_baselines(source, ids[:-VAL_CASES], ids[-VAL_CASES:], plan)
        if profiler is not None:
            profiler.disable()
        total = time.perf_counter() - t0
    print(f"{args.dims}D, {args.steps} steps, batch {plan['batch_size']}, roi {plan['roi']}, widths "
          f"{plan['model']['features']}, {torch.get_num_threads()} torch thread(s)")
    for name, r in results.items():
        print(f"  {name:12s} train {1000 * r.seconds / args.steps:7.1f} ms/step   eval {r.eval_s:6.2f} s   "
              f"WT Dice {r.validation['dice']['WT']:.3f}")
    data_s = next(iter(results.values())).data_s
    print(f"  batches      {1000 * data_s / args.steps:7.1f} ms/step (one batch shared by every model)")
    print(f"total {total:.1f} s")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.profile)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
