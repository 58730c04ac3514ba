"""Benchmark: seconds per phantom case on one CPU thread, generation and ``.nii.gz`` writing separately.

Run ``python -m splitunet.bench.phantom_speed [--cases 5] [--shape 240,240,155] [--layout brats2021]``.
The target of issue 3 is <= 3 s per 240 x 240 x 155 case (generation + writing). The one-off template
preparation (nilearn import, reading the MNI volumes) is reported separately. Results go to stdout: this is a
command-line program.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--shape must be X,Y,Z, got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, time ``--cases`` cases, print per-case and summary seconds."""
    parser = argparse.ArgumentParser(prog="python -m splitunet.bench.phantom_speed", description=__doc__)
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--shape", type=_shape, default=(240, 240, 155))
    parser.add_argument("--layout", default="brats2021")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch/BLAS (default 1)")
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        result = time_cases(args.cases, args.shape, layout=args.layout, seed=args.seed)
    print(f"template preparation: {result['template_s']:.2f} s (once per cohort)")
    gen, write, cpu = result["generate_s"], result["write_s"], result["cpu_s"]
    for index, (g, w, c) in enumerate(zip(gen, write, cpu, strict=True)):
        print(f"case {index}: generate {g:.2f} s, write {w:.2f} s, total {g + w:.2f} s (CPU time {c:.2f} s)")
    total = [g + w for g, w in zip(gen, write, strict=True)]
    print(
        f"shape {args.shape}, {args.threads} thread(s), {args.cases} cases: seconds per case (wall) "
        f"median {statistics.median(total):.2f} (generate {statistics.median(gen):.2f}, "
        f"write {statistics.median(write):.2f}), min {min(total):.2f}, max {max(total):.2f}; "
        f"CPU time per case median {statistics.median(cpu):.2f} s (wall exceeds it when the machine is busy)"
    )
    return 0


def time_cases(cases: int, shape: tuple[int, int, int], *, layout: str = "brats2021", seed: int = 0) -> dict:
    """Seconds per phantom case: ``template_s`` (once), and per case ``generate_s``, ``write_s`` (``.nii.gz``)
    and ``cpu_s`` (process CPU time of both), in the calling thread's torch/BLAS settings."""
    from splitunet.data.mni import MniAnatomy
    from splitunet.data.phantom import case_id, case_rng, make_case, output_spacing, write_case

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        anatomy = MniAnatomy.load(output_spacing(shape))
        template_s = time.perf_counter() - t0
        gen, write, cpu = [], [], []
        for index in range(cases):
            c0, t0 = time.process_time(), time.perf_counter()
            case = make_case(case_rng(seed, index), shape, layout=layout, anatomy=anatomy)
            t1 = time.perf_counter()
            write_case(case, Path(tmp), case_id(index, layout), layout)
            write.append(time.perf_counter() - t1)
            gen.append(t1 - t0)
            cpu.append(time.process_time() - c0)
    return {"shape": list(shape), "template_s": template_s, "generate_s": gen, "write_s": write, "cpu_s": cpu}


if __name__ == "__main__":
    raise SystemExit(main())
