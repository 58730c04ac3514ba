"""Benchmark of the defenses: overhead per split step, and Dice at a mild and a strong setting.

``--part overhead``: the time of each defense's own work in one split step (forward and backward hook at 4 sites,
or the aggregator's gradient filters for 4 sites; NoPeek's term and its gradient; secure sum's masking at 4 sites
and unmasking) against the whole undefended in-process step (4 sites, 2D, widths 8-16-32-64, 64x64 crops, batch 8,
cut 0), each the minimum over ``--steps`` repeats; and the zstd-compressed fp16 bytes of one site's bundle (the
bandwidth effect of quantisation and top-k).

``--part dice``: short in-process training on synthetic 2D volumes (:mod:`splitunet.data.synthetic`, 32x32,
batch 8, widths 8-16-32) with each defense at a mild and a strong setting; Dice (WT, mean) on held-out
synthetic slices against the undefended run. Secure sum is compared with plain ``sum`` fusion.

It prints figures of this machine; nothing is asserted. ``python -m splitunet.bench.defenses --part all``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from splitunet.config import MODALITIES, SiteSpec, SplitUNetConfig
from splitunet.data.synthetic import synthetic_batch
from splitunet.defenses import build_filter, build_gradient_chain
from splitunet.defenses.config import NoPeekConfig
from splitunet.filters import Direction, FilterChain, FilterContext
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
    """Per defense, the time of its own work in one split step (all 4 sites), against the undefended step.

    Both are the minimum over ``steps`` repeats (robust to other load on a shared machine)."""
    config = four_sites((8, 16, 32, 64))
    images, regions = synthetic_batch(8, (64, 64), generator=torch.Generator().manual_seed(0))
    base_fed = federation(config, None, SITE)
    inputs = base_fed.model.split_inputs(images)

    def best(fn) -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    counter = iter(range(1, 10**9))
    base = best(lambda: base_fed.train_step(images, regions, next(counter)))
    sent = {n: s.forward(inputs[n], step=10**6) for n, s in base_fed.sites.items()}
    result = base_fed.aggregator.step(sent, regions)
    outputs = {n: base_fed.sites[n].encoder(inputs[n]) for n in sent}
    context = FilterContext("bench", 1, "t1", Direction.ACTIVATIONS, groups=tuple("abcdefgh"), sample_rate=0.1)

    def site_bytes(tensors) -> int:
        meta = BundleMeta(run_id="bench", step=1, site="t1", kind=BundleKind.ACTIVATIONS)
        return len(encode_bundle(tensors, meta=meta, dtype=WireDtype.FP16, compress=True, max_bytes=DEFAULT_MAX_BYTES))

    print(f"defense work per split step (4 sites; in process, 2D 64x64, widths 8-16-32-64, batch 8, cut 0, "
          f"{torch.get_num_threads()} thread(s), minimum of {steps})")
    print("| defense | setting | ms per step | % of the undefended step | zstd fp16 bytes of one site's bundle |")
    print("|---|---|---|---|---|")
    print(f"| none (whole step) | | {base * 1e3:.1f} | | {site_bytes(sent['t1'])} |")
    from splitunet.defenses.config import parse_site_defenses

    for label, where, mild, strong in CASES:
        for setting in (mild, strong) if strong else (mild,):
            shown = {k: v for k, v in setting.items() if k not in ("name", "patch", "points")}
            size = ""
            if where == SITE and setting["name"] == "nopeek":
                term = build_filter(parse_site_defenses([setting])[0])

                def work(term=term):
                    for n in sent:
                        x = inputs[n]
                        out = {k: v.detach().requires_grad_(True) for k, v in outputs[n].items()}
                        torch.autograd.grad(term(x, out), list(out.values()))
            elif where == SITE:
                chains = {n: FilterChain([build_filter(parse_site_defenses([setting])[0])]) for n in sent}

                def work(chains=chains):
                    for n, chain in chains.items():
                        chain.apply(sent[n], context).backward(result.gradients[n])

                size = site_bytes(chains["t1"](sent["t1"], context))
            else:
                from pydantic import TypeAdapter

                from splitunet.defenses.config import GradientDefenseConfig

                chain = build_gradient_chain([TypeAdapter(GradientDefenseConfig).validate_python(setting)],
                                             sample_rate=0.1)
                grad_context = FilterContext("bench", 1, "t1", Direction.GRADIENTS)

                def work(chain=chain, grad_context=grad_context):
                    for n in sent:
                        chain(result.gradients[n], grad_context)
            seconds = best(work)
            print(f"| {label} | {shown} | {seconds * 1e3:.1f} | {100 * seconds / base:.0f} % | {size} |")
    secure = SecureSumStep(federation(four_sites((8, 16, 32, 64), "sum"), None, SITE))
    unmask = secure.fed.aggregator.inbound

    def masking():
        nonce = request_nonce("bench", str(next(counter)))
        unmask({n: secure.maskers[n].mask(sent[n], nonce) for n in sent})

    seconds = best(masking)
    print(f"| secure sum | 24-bit, mask at 4 sites + unmask | {seconds * 1e3:.1f} | {100 * seconds / base:.0f} % | |")


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
