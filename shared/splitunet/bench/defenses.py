"""Benchmark of the defenses: overhead per split step, and Dice at a mild and a strong setting.

``--part overhead``: the in-process split step (4 sites, 2D, widths 8-16-32-64, 64x64 crops, batch 8, cut 0)
with one defense at every site (or on the aggregator's gradients), median seconds per step over ``--steps``
after a warm-up, against no defense; and the zstd-compressed activation bytes of one site (the bandwidth
effect of quantisation and top-k). Secure sum is timed as masking at every site plus unmasking.

``--part dice``: short in-process training on synthetic 2D volumes (:mod:`splitunet.data.synthetic`, 32x32,
batch 8, widths 8-16-32) with each defense at a mild and a strong setting; Dice (WT, mean) on held-out
synthetic slices against the undefended run. Secure sum is compared with plain ``sum`` fusion.

It prints figures of this machine; nothing is asserted. ``python -m splitunet.bench.defenses --part all``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from splitunet.config import MODALITIES, SiteSpec, SplitUNetConfig
from splitunet.data.synthetic import synthetic_batch
from splitunet.defenses import build_filter, build_gradient_chain
from splitunet.defenses.config import NoPeekConfig
from splitunet.filters import FilterChain
from splitunet.secure_sum import SecureSumOptions, SecureSumPeers, SiteMasker, SumUnmasker, request_nonce
from splitunet.training import InProcessFederation
from splitunet.wire import DEFAULT_MAX_BYTES, BundleKind, BundleMeta, WireDtype, encode_bundle

SITE = "site"
GRAD = "gradient"
#: (label, where, mild configuration, strong configuration)
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]] = [
    ("gaussian", SITE, {"name": "gaussian", "sigma0": 0.05}, {"name": "gaussian", "sigma0": 1.0}),
    ("laplace", SITE, {"name": "laplace", "b0": 0.05}, {"name": "laplace", "b0": 0.7}),
    ("dp", SITE, {"name": "dp", "clip": 100.0, "noise_multiplier": 0.005},
     {"name": "dp", "clip": 20.0, "noise_multiplier": 0.1}),
    ("quantize", SITE, {"name": "quantize", "mode": "int8"}, {"name": "quantize", "mode": "int4"}),
    ("topk", SITE, {"name": "topk", "keep": 0.5}, {"name": "topk", "keep": 0.05}),
    ("nopeek", SITE, {"name": "nopeek", "alpha": 0.1, "patch": 4, "points": 128},
     {"name": "nopeek", "alpha": 2.0, "patch": 4, "points": 128}),
    # per-sample gradient norms are ~1e-4 here (printed by --part dice): C and z are set relative to that
    ("gradient dp", GRAD, {"name": "dp", "clip": 1e-4, "noise_multiplier": 0.001},
     {"name": "dp", "clip": 5e-5, "noise_multiplier": 0.5}),
    ("norm_equalize", GRAD, {"name": "norm_equalize"}, None),
    ("smooth", GRAD, {"name": "smooth", "sigma": 0.5}, {"name": "smooth", "sigma": 2.0}),
]


def four_sites(features: tuple[int, ...], fusion: str = "concat") -> SplitUNetConfig:
    sites = tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES)
    return SplitUNetConfig(spatial_dims=2, features=features, sites=sites, cut_level=0, fusion=fusion)


def federation(config: SplitUNetConfig, defense: dict[str, Any] | None, where: str, lr: float = 3e-3):
    """An in-process federation with ``defense`` at every site (a fresh object per site) or at the aggregator."""
    from splitunet.defenses.config import parse_site_defenses

    site_filters, terms, gradient = None, (), None
    if defense is not None and where == SITE:
        parsed = parse_site_defenses([defense])[0]
        if isinstance(parsed, NoPeekConfig):
            terms = (build_filter(parsed),)
        else:
            site_filters = lambda name: FilterChain([build_filter(parsed)])  # noqa: E731
    elif defense is not None:
        from pydantic import TypeAdapter

        from splitunet.defenses.config import GradientDefenseConfig

        gradient = build_gradient_chain([TypeAdapter(GradientDefenseConfig).validate_python(defense)])
    return InProcessFederation(config, seed=0, lr_site=lr, lr_server=lr, loss="dice_ce", site_filters=site_filters,
                               site_loss_terms=terms, gradient_filters=gradient)


class SecureSumStep:
    """Plain-sum federation whose site tensors are masked and unmasked around the aggregator (secure sum)."""

    def __init__(self, fed: InProcessFederation) -> None:
        self.fed = fed
        names = list(fed.sites)
        self.maskers = {n: SiteMasker(n, "bench") for n in names}
        peers = SecureSumPeers(keys={n: m.public_key for n, m in self.maskers.items()}, order=names)
        for m in self.maskers.values():
            m.establish(peers)
        fed.aggregator.inbound = SumUnmasker(SecureSumOptions(), names)

    def train_step(self, images: torch.Tensor, regions: torch.Tensor, step: int) -> float:
        fed = self.fed
        inputs = fed.model.split_inputs(images)
        nonce = request_nonce("bench", str(step))
        sent = {n: self.maskers[n].mask(s.forward(inputs[n], step=step), nonce) for n, s in fed.sites.items()}
        result = fed.aggregator.step(sent, regions, step=step)
        for n, s in fed.sites.items():
            s.backward(result.gradients[n], step=step)
        return result.loss

    def evaluate(self, batches) -> dict:
        """Dice through the masked path (sites mask their evaluation forwards too)."""
        from splitunet.metrics import RegionMetrics

        metrics = RegionMetrics()
        for index, (images, regions) in enumerate(batches):
            inputs = self.fed.model.split_inputs(images)
            nonce = request_nonce("bench", f"eval-{index}")
            sent = {n: self.maskers[n].mask(s.forward(inputs[n], step=-1, train=False), nonce)
                    for n, s in self.fed.sites.items()}
            metrics.update(self.fed.aggregator.predict(sent), regions)
        return metrics.aggregate()


def overhead(steps: int) -> None:
    config = four_sites((8, 16, 32, 64))
    batch = synthetic_batch(8, (64, 64), generator=torch.Generator().manual_seed(0))

    def timed(trainer) -> float:
        times = []
        for step in range(1, steps + 3):
            t0 = time.perf_counter()
            trainer.train_step(*batch, step)
            if step > 2:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def site_bytes(fed: InProcessFederation) -> int:
        site = fed.sites["t1"]
        tensors = site.forward(fed.model.split_inputs(batch[0])["t1"], step=10_000, train=False)
        meta = BundleMeta(run_id="bench", step=1, site="t1", kind=BundleKind.ACTIVATIONS)
        return len(encode_bundle(tensors, meta=meta, dtype=WireDtype.FP16, compress=True, max_bytes=DEFAULT_MAX_BYTES))

    base_fed = federation(config, None, SITE)
    base = timed(base_fed)
    base_bytes = site_bytes(base_fed)
    print(f"overhead per split step (in process, 4 sites, 2D 64x64, widths 8-16-32-64, batch 8, "
          f"{torch.get_num_threads()} threads, median of {steps})")
    print("| defense | setting | ms/step | overhead | zstd fp16 bytes of one site |\n|---|---|---|---|---|")
    print(f"| none | | {base * 1e3:.1f} | | {base_bytes} |")
    for label, where, mild, strong in CASES:
        for setting in (mild, strong) if strong else (mild,):
            fed = federation(config, setting, where)
            seconds = timed(fed)
            shown = {k: v for k, v in setting.items() if k not in ("name", "patch", "points")}
            print(f"| {label} | {shown} | {seconds * 1e3:.1f} | {100 * (seconds / base - 1):+.0f} % | "
                  f"{site_bytes(fed) if where == SITE else ''} |")
    plain = federation(four_sites((8, 16, 32, 64), "sum"), None, SITE)
    plain_s = timed(plain)
    secure_s = timed(SecureSumStep(federation(four_sites((8, 16, 32, 64), "sum"), None, SITE)))
    print(f"| secure sum (vs plain sum {plain_s * 1e3:.1f} ms) | 24-bit | {secure_s * 1e3:.1f} | "
          f"{100 * (secure_s / plain_s - 1):+.0f} % | |")


def dice(steps: int) -> None:
    held = synthetic_batch(16, (32, 32), generator=torch.Generator().manual_seed(99))

    def train(trainer, fed: InProcessFederation) -> dict[str, float]:
        g = torch.Generator().manual_seed(1)
        for step in range(1, steps + 1):
            trainer.train_step(*synthetic_batch(8, (32, 32), generator=g), step)
        return trainer.evaluate([held])["dice"]

    config = four_sites((8, 16, 32))
    fed = federation(config, None, SITE)
    base = train(fed, fed)
    images, regions = synthetic_batch(8, (32, 32), generator=torch.Generator().manual_seed(5))
    inputs = fed.model.split_inputs(images)
    result = fed.aggregator.step({n: s.forward(inputs[n], step=0) for n, s in fed.sites.items()}, regions)
    from splitunet.defenses.base import per_sample_sq_norms

    grad_norm = float(per_sample_sq_norms(result.gradients["t1"]).sqrt().median())
    act_norm = float(per_sample_sq_norms(fed.sites["t1"].forward(inputs["t1"], step=0, train=False)).sqrt().median())
    print(f"Dice after {steps} in-process steps on synthetic 2D slices (32x32, batch 8), held-out 16 slices; "
          f"median per-sample norms after training: activations {act_norm:.3g}, gradients {grad_norm:.3g}")
    print("| defense | setting | WT | mean | WT change |\n|---|---|---|---|---|")
    print(f"| none | | {base['WT']:.3f} | {base['mean']:.3f} | |")
    for label, where, mild, strong in CASES:
        for name, setting in (("mild", mild), ("strong", strong)):
            if setting is None:
                continue
            fed = federation(config, setting, where)
            got = train(fed, fed)
            shown = {k: v for k, v in setting.items() if k not in ("name", "patch", "points")}
            print(f"| {label} ({name}) | {shown} | {got['WT']:.3f} | {got['mean']:.3f} | "
                  f"{got['WT'] - base['WT']:+.3f} |")
    plain = federation(four_sites((8, 16, 32), "sum"), None, SITE)
    plain_d = train(plain, plain)
    secure_fed = federation(four_sites((8, 16, 32), "sum"), None, SITE)
    secure_d = train(SecureSumStep(secure_fed), secure_fed)
    print(f"| plain sum fusion | | {plain_d['WT']:.3f} | {plain_d['mean']:.3f} | |")
    print(f"| secure sum | 24-bit, R=64 | {secure_d['WT']:.3f} | {secure_d['mean']:.3f} | "
          f"{secure_d['WT'] - plain_d['WT']:+.3f} (vs plain sum) |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitunet.bench.defenses", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["overhead", "dice", "all"], default="all")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per defense (overhead)")
    parser.add_argument("--train-steps", type=int, default=60, help="training steps per run (dice)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part in ("overhead", "all"):
        overhead(args.steps)
    if args.part in ("dice", "all"):
        dice(args.train_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
