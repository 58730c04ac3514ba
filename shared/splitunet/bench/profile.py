"""Where the time of a 2D split step goes: a wall-clock breakdown per step, and py-spy profiles per service.

``python -m splitunet.bench.profile [--steps N] [--cut 0|1|2] [--out DIR]`` measures, on the current machine, the
bench's P2 configuration (2D, cut 0 unless ``--cut`` says otherwise, ROI 128², batch 8, widths 8-64, K = 4 sites,
phantom cohort of 5 cases):

1. **Components, in process** (one torch thread, the services' code and sizes, each timed on its own; the K sites
   one after the other): plan (sampling and labels), site extract, encoder forward, activation encode (fp16
   bundle) and decode, decoder (fusion, forward, loss, backward), decoder optimizer, gradient encode (fp32 bundle)
   and decode, encoder backward, encoder optimizer. Medians per step after warm-up.
2. **Over HTTP** (:class:`~splitunet.bench.split_step.HttpFederation`: K site processes and the aggregator,
   torch threads from :func:`~splitunet.launcher.thread_budget`): the job's own phases per step (plan, forward,
   aggregator, backward; ``JobStatus.step_times``), and per phase what the components above do not explain: the
   transfer, HTTP handling and the five processes' contention for the cores.
3. **py-spy** (``py-spy record --nonblocking``, 100 Hz, every thread, idle threads not sampled) of the aggregator and
   of site ``t1`` during the job's steady steps: the top functions by inclusive and by self time, in CPU seconds
   per step (threads add up: the aggregator's K request threads can exceed the wall time).

Printed and written to ``DIR`` (``profile.json``, ``<service>.pyspy.txt`` raw stacks); never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

#: py-spy's sampling rate (Hz).
RATE = 100
#: Components of the in-process breakdown, in step order, and the HTTP phase each belongs to.
COMPONENTS = {
    "plan": "plan", "site_extract": "forward", "encoder": "forward", "activation_encode": "forward",
    "activation_decode": "forward", "decoder": "aggregator", "decoder_optimizer": "aggregator",
    "gradient_encode": "backward", "gradient_decode": "backward", "encoder_backward": "backward",
    "encoder_optimizer": "backward",
}


def bench_case(cut_level: int = 0):
    from splitunet.bench.split_step import StepCase
    from splitunet.bench.suite import BenchPlan

    plan = BenchPlan.full()
    return StepCase(dims=2, cut_level=cut_level, roi=plan.roi_2d, sites=4, batch=plan.batch_2d,
                    features=plan.features_2d)


def components(case, cohort: Path, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each component (see the module docstring), one torch thread."""
    import numpy as np
    import torch

    from splitunet.bench.split_step import _plan
    from splitunet.data.grid import case_grid
    from splitunet.data.layout import discover_cases
    from splitunet.data.loader import load_images, load_regions
    from splitunet.data.sampling import extract
    from splitunet.federation import FederationSpec
    from splitunet.networks.factory import make_optimizer
    from splitunet.protocol import AggregatorStep, SiteStep
    from splitunet.training import InProcessFederation
    from splitunet.wire import BundleKind, BundleMeta, WireDtype, decode_bundle, encode_bundle

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = FederationSpec.model_validate(case.spec(steps))
        config = spec.model.build(case.site_specs())
        fed = InProcessFederation(config, seed=spec.seed, loss=spec.loss)
        sites = {n: SiteStep(s.encoder) for n, s in fed.sites.items()}  # optimizers stepped (and timed) below
        site_opts = {n: make_optimizer(s.encoder.parameters(), lr=1e-3) for n, s in sites.items()}
        agg = AggregatorStep(fed.model.decoder, fed.aggregator.loss_fn)
        agg_opt = make_optimizer(fed.model.decoder.parameters(), lr=1e-3)
        cases = discover_cases(cohort)
        images = {c: {m: load_images(v, (m,)).array for m in config.modalities} for c, v in cases.items()}
        labels = {c: load_regions(v) for c, v in cases.items()}
        extents = {c: case_grid(v, config.modalities).brain_z for c, v in cases.items()}
        train = sorted(cases)[1:]
        rng = np.random.default_rng(spec.seed)
        rows = []
        for step in range(1, steps + 1):
            t: Counter[str] = Counter()
            t0 = time.perf_counter()
            samples = _plan(case, spec, rng, train, labels.__getitem__, extents.__getitem__)
            y = np.stack([extract(labels[s.case_id], s, interpolation="nearest") for s in samples])
            regions = torch.from_numpy(y.astype(np.float32))
            t["plan"] = time.perf_counter() - t0
            received = {}
            for site in config.sites:
                t0 = time.perf_counter()
                x = torch.from_numpy(np.stack([extract(images[s.case_id][site.modalities[0]], s) for s in samples]))
                t1 = time.perf_counter()
                sent = sites[site.name].forward(x, step=step)
                t2 = time.perf_counter()
                meta = BundleMeta(run_id="p", step=step, site=site.name, kind=BundleKind.ACTIVATIONS)
                data = encode_bundle(sent, meta=meta, dtype=WireDtype.FP16, max_bytes=2**34)
                t3 = time.perf_counter()
                received[site.name] = decode_bundle(data, max_bytes=2**34).tensors
                t4 = time.perf_counter()
                t["site_extract"] += t1 - t0
                t["encoder"] += t2 - t1
                t["activation_encode"] += t3 - t2
                t["activation_decode"] += t4 - t3
            t0 = time.perf_counter()
            agg_opt.zero_grad(set_to_none=True)
            result = agg.step(received, regions, step=step)
            t1 = time.perf_counter()
            agg_opt.step()
            t["decoder"], t["decoder_optimizer"] = t1 - t0, time.perf_counter() - t1
            for name, step_ in sites.items():
                t0 = time.perf_counter()
                meta = BundleMeta(run_id="p", step=step, site=name, kind=BundleKind.GRADIENTS)
                data = encode_bundle(result.gradients[name], meta=meta, dtype=WireDtype.FP32, max_bytes=2**34)
                t1 = time.perf_counter()
                grads = decode_bundle(data, max_bytes=2**34).tensors
                t2 = time.perf_counter()
                site_opts[name].zero_grad(set_to_none=True)
                step_.backward(grads, step=step)
                t3 = time.perf_counter()
                site_opts[name].step()
                t4 = time.perf_counter()
                t["gradient_encode"] += t1 - t0
                t["gradient_decode"] += t2 - t1
                t["encoder_backward"] += t3 - t2
                t["encoder_optimizer"] += t4 - t3
            rows.append(t)
        kept = rows[warmup:] or rows
        return {k: statistics.median(r[k] for r in kept) for k in COMPONENTS}
    finally:
        torch.set_num_threads(previous)


def pyspy_binary() -> str | None:
    """The py-spy executable next to this Python, or on ``PATH``; ``None`` if it is not installed."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.is_file() else shutil.which("py-spy")


def top_functions(raw: Path, steps: float, n: int = 15) -> dict:
    """Top functions of py-spy raw (collapsed) stacks: inclusive and self CPU seconds per step."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    per_step = 1.0 / (RATE * max(steps, 1e-9))
    return {
        "active_s_per_step": total * per_step,
        "inclusive": [(f, c * per_step) for f, c in inclusive.most_common(n)],
        "self": [(f, c * per_step) for f, c in own.most_common(n)],
    }


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/shared/", "/services/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def over_http(case, parts, workdir: Path, steps: int, warmup: int, out: Path) -> dict:
    """The job's phases over HTTP, with py-spy on the aggregator and site ``t1`` during the steady steps."""
    import httpx

    from splitunet.bench.machine import usable_cores
    from splitunet.bench.split_step import FINAL_STATES, HttpFederation, after_warmup
    from splitunet.launcher import thread_budget

    site_threads, agg_threads = thread_budget(case.sites, usable_cores())
    pyspy = pyspy_binary()
    doc: dict = {"site_torch_threads": site_threads, "aggregator_torch_threads": agg_threads, "py_spy": pyspy}
    with HttpFederation(workdir, parts, max_sites=case.sites, site_threads=site_threads,
                        aggregator_threads=agg_threads) as http:
        assert http.aggregator is not None
        pids = {p.name: p.process.pid for p in http.fed.processes}
        targets = {"aggregator": pids["aggregator"], "site-t1": pids["site-t1"]}
        spies: dict[str, subprocess.Popen] = {}
        with httpx.Client(base_url=http.aggregator.url, headers=http.fed.operator_headers(), timeout=60) as client:
            job_id = client.post("/v1/jobs", json=case.spec(steps)).raise_for_status().json()["job_id"]
            first = last = None
            while (status := client.get(f"/v1/jobs/{job_id}").raise_for_status().json())["state"] not in FINAL_STATES:
                if first is None and status["step"] >= warmup and pyspy:
                    first = status["step"]
                    for name, pid in targets.items():
                        spies[name] = subprocess.Popen(
                            [pyspy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
                             "--function", "--nonblocking", "-o", str(out / f"{name}.pyspy.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if spies and last is None and status["step"] >= steps - 1:
                    last = status["step"]  # stop before the final validation
                    for spy in spies.values():
                        spy.send_signal(signal.SIGINT)
                time.sleep(0.05)
            for spy in spies.values():
                if spy.poll() is None:
                    spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
        if status["state"] != "succeeded":
            raise RuntimeError(f"profile job {status['state']}: {status.get('error')}")
        records = after_warmup(status["step_times"], warmup)
        doc["phases_s"] = {k: statistics.median(r[k] for r in records) for k in ("plan", "forward", "aggregator",
                                                                                 "backward", "total")}
        if first is not None and last is not None:
            profiled = max(last - first, 1)
            doc["profiled_steps"] = [first, last]
            doc["py_spy"] = {name: top_functions(out / f"{name}.pyspy.txt", profiled) for name in targets
                             if (out / f"{name}.pyspy.txt").is_file()}
    return doc


def profile(steps: int, warmup: int, out: Path, cut_level: int = 0) -> dict:
    from splitunet.bench.machine import machine_info
    from splitunet.data.partition import partition_cohort
    from splitunet.data.phantom import write_cohort

    case = bench_case(cut_level)
    doc: dict = {"config": case.label, "steps": steps, "warmup": warmup, "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="splitunet-profile-") as tmp:
        root = Path(tmp)
        write_cohort(root / "cohort", 5, seed=0, shape=(128, 128, 80))
        parts = partition_cohort(root / "cohort", root / "parts")
        doc["components_s"] = components(case, root / "cohort", steps, warmup)
        doc["http"] = over_http(case, parts, root / "fed", steps, warmup, out)
    by_phase: Counter[str] = Counter()
    for name, seconds in doc["components_s"].items():
        by_phase[COMPONENTS[name]] += seconds
    doc["components_by_phase_s"] = dict(by_phase)
    doc["unexplained_by_phase_s"] = {k: doc["http"]["phases_s"][k] - by_phase[k] for k in by_phase}
    doc["load_average_end"] = os.getloadavg()[0]
    doc["machine"] = machine_info()
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="training steps (HTTP job and in-process loop)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians and the profiles")
    parser.add_argument("--out", type=Path, default=Path("runs/profile"), help="folder for the JSON and raw stacks")
    parser.add_argument("--cut", type=int, default=0, choices=(0, 1, 2), help="the cut level (P2's rows: 0 and 2)")
    args = parser.parse_args(argv)
    if args.steps < args.warmup + 3:
        parser.error("--steps must exceed --warmup by at least 3")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = profile(args.steps, args.warmup, args.out, args.cut)
    (args.out / "profile.json").write_text(json.dumps(doc, indent=2))
    m, http = doc["machine"], doc["http"]
    print(f"{doc['config']} on {m['cpu_model']}, {m['cores']} cores, load average "
          f"{doc['load_average_start']:.1f} -> {doc['load_average_end']:.1f}")
    print("components in process, 1 thread, seconds per step (K sites summed):")
    for name, seconds in doc["components_s"].items():
        print(f"  {name:<20} {seconds:7.4f}   ({COMPONENTS[name]})")
    print("phase        HTTP   in-process components   unexplained (transfer, HTTP, contention)")
    for phase, comp in doc["components_by_phase_s"].items():
        print(f"  {phase:<10} {http['phases_s'][phase]:6.3f} {comp:10.3f} {doc['unexplained_by_phase_s'][phase]:16.3f}")
    print(f"  HTTP step total {http['phases_s']['total']:.3f} s")
    for service, top in http.get("py_spy", {}).items():
        print(f"py-spy {service}: {top['active_s_per_step']:.3f} CPU s per step sampled; top inclusive / self:")
        for (fi, si), (fs, ss) in zip(top["inclusive"], top["self"], strict=False):
            print(f"  {si:6.3f} {fi[:70]:<70} {ss:6.3f} {fs[:70]}")
    if not http.get("py_spy"):
        print("py-spy: not installed (pip install py-spy) or the job ended before the profile; no profile")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
