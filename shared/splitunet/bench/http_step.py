"""Benchmark: one split training step over HTTP (real uvicorn services) versus the same step in process.

Run ``python -m splitunet.bench.http_step [--steps 40] [--dims 2] [--batch 8]``. Both runs train the same model
on the same phantom cohort with the same batch size:

- **HTTP**: 4 site services and the aggregator as processes on 127.0.0.1 (one torch thread each), a job posted
  to the REST API, fp16 activations and fp32 gradients on the wire; seconds per step from the job's own timer.
- **in process**: :class:`splitunet.training.InProcessFederation`, the same protocol without HTTP, fp32, with as
  many torch threads as cores.

It prints both, their ratio and the bytes per step; the figures are measurements of this machine, not targets.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitunet.bench.http_step", description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    import httpx
    import numpy as np
    import torch

    from splitunet.config import MODALITIES, SiteSpec
    from splitunet.data.layout import discover_cases
    from splitunet.data.loader import load_images, load_regions
    from splitunet.data.partition import partition_cohort
    from splitunet.data.phantom import write_cohort
    from splitunet.data.sampling import extract, plan_patches, plan_slices
    from splitunet.federation import FederationSpec
    from splitunet.launcher import LocalFederation
    from splitunet.training import InProcessFederation

    model = {"spatial_dims": args.dims, "features": [8, 16, 32, 64]}
    roi = [64, 64] if args.dims == 2 else [64, 64, 64]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cohort(root / "cohort", 6, seed=0, shape=(96, 96, 64))
        parts = partition_cohort(root / "cohort", root / "parts")

        # --- over HTTP
        with LocalFederation(root / "fed", torch_threads=1) as fed:
            for m in MODALITIES:
                fed.start_site(m, [m], parts.site_dir(m), seed=0)
            peers = list(MODALITIES)
            agg = fed.start_aggregator(parts.aggregator_dir)
            fed.wait_ready(timeout_s=180)
            spec = {"sites": peers, "model": model, "roi": roi, "batch_size": args.batch, "steps": args.steps,
                    "val_cases": 1, "val_interval": 0, "max_val_cases": 1, "loss": "dice_ce"}
            headers = fed.operator_headers()
            with httpx.Client(base_url=agg.url, headers=headers, timeout=60) as client:
                job_id = client.post("/v1/jobs", json=spec).raise_for_status().json()["job_id"]
                while (status := client.get(f"/v1/jobs/{job_id}").json())["state"] not in (
                    "succeeded", "failed", "stopped"
                ):
                    time.sleep(0.5)
        if status["state"] != "succeeded":
            print(json.dumps(status, indent=2))
            return 1
        http_s = status["timing"]["train_s"] / args.steps
        bytes_step = (status["bytes_sent"] + status["bytes_received"]) / args.steps

        # --- in process, same model and batch
        torch.set_num_threads(os.cpu_count() or 1)
        fspec = FederationSpec.model_validate(spec)
        config = fspec.model.build(tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES))
        federation = InProcessFederation(config, loss="dice_ce")
        cases = discover_cases(root / "cohort")
        data = {c: (load_images(case).array, load_regions(case)) for c, case in cases.items()}
        rng = np.random.default_rng(0)
        plan = plan_slices if args.dims == 2 else plan_patches
        times = []
        for step in range(1, args.steps + 1):
            ids = rng.choice(sorted(data), size=args.batch)
            samples = [plan(str(c), data[c][1].shape[1:], roi, 1, rng)[0] for c in ids]
            images = torch.from_numpy(np.stack([extract(data[s.case_id][0], s) for s in samples]))
            regions = torch.from_numpy(np.stack([extract(data[s.case_id][1], s) for s in samples]).astype(np.float32))
            t0 = time.perf_counter()
            federation.train_step(images, regions, step)
            times.append(time.perf_counter() - t0)
        local_s = float(np.median(times[2:] if len(times) > 4 else times))

    print(f"model {model}, roi {roi}, batch {args.batch}, {args.steps} steps, 4 sites")
    print(f"HTTP (5 processes, fp16 activations / fp32 gradients): {http_s * 1000:8.1f} ms/step "
          f"({bytes_step / 2**20:.1f} MiB/step on the wire)")
    print(f"in process (fp32, {torch.get_num_threads()} threads):              {local_s * 1000:8.1f} ms/step")
    print(f"ratio HTTP / in process: {http_s / local_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
