"""Benchmark: white-box inversion of one 2D 128 x 128 phantom slice on 2 threads, and learned inversion per slice.

Run ``python -m splitunet.bench.audit_speed [--iterations 200] [--threads 2]``. Targets (issue 11): white-box
<= 10 s per slice, learned inversion <= 50 ms per slice (amortised: decoder training is reported separately).
Site t1, cut level 0, widths 16-32-64-128 (the encoder's first block), phantom volumes of 128 x 128 x 80.
Prints the brain SSIM reached too, so a fast but weak attack is visible. Results go to stdout.
"""

from __future__ import annotations

import argparse
import time


def _scene(size: int = 128):
    """The benchmark's slice and what the attacks see of it: ``(slice (1, 1, size, size), public cohort, sample,
    config, encoder, white-box observation)``; site t1, cut level 0, widths 16-32-64-128, volumes size² x 80."""
    import torch

    from splitunet.attacks.base import Observation
    from splitunet.auditing.cohorts import PublicCohort
    from splitunet.config import SiteSpec, SplitUNetConfig
    from splitunet.data.sampling import Sample
    from splitunet.networks.factory import make_site_encoder

    shape = (size, size, 80)
    federation, public = PublicCohort(shape, 1, seed=1), PublicCohort(shape, 8)
    sample = Sample(case_id="bench", start=(0, 0), size=(size, size), axial_index=40, volume_shape=shape)
    x = federation.images([sample], ["t1"])[0]
    config = SplitUNetConfig(spatial_dims=2, features=(16, 32, 64, 128),
                             sites=(SiteSpec(name="t1", modalities=("t1",)),))
    encoder = make_site_encoder(config, "t1", 0).eval()
    with torch.no_grad():
        features = encoder(torch.from_numpy(x))
    prior = torch.from_numpy(public.prior([sample], ["t1"]))
    obs = Observation(config=config, site="t1", activations=features, encoder_state=encoder.state_dict(), prior=prior)
    return x, public, sample, config, encoder, obs


def whitebox_seconds(iterations: int = 200, size: int = 128) -> dict:
    """White-box inversion of one ``size`` x ``size`` phantom slice (site t1, cut level 0, widths 16-32-64-128)
    in the calling thread's torch settings: ``{"seconds", "iterations", "size", "brain_ssim"}``."""
    from splitunet.attacks.whitebox import WhiteBoxInversion
    from splitunet.leakage import brain_ssim

    x, _, _, _, _, obs = _scene(size)
    t0 = time.perf_counter()
    recon = WhiteBoxInversion(iterations=iterations)(obs)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "iterations": iterations, "size": size,
            "brain_ssim": float(brain_ssim(recon[0, 0].numpy(), x[0, 0]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitunet.bench.audit_speed", description=__doc__)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--learned-batch", type=int, default=16)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from splitunet.attacks.base import Observation
    from splitunet.attacks.learned import LearnedInversion
    from splitunet.leakage import brain_ssim

    torch.set_num_threads(args.threads)
    wb = whitebox_seconds(args.iterations)
    print(f"white-box inversion, 1 slice 128x128, {args.iterations} iterations, {args.threads} threads: "
          f"{wb['seconds']:.2f} s (target <= 10 s), brain SSIM {wb['brain_ssim']:.3f}")

    x, public, sample, config, encoder, obs = _scene()
    samples = [sample.model_copy(update={"axial_index": z}) for z in range(30, 50, 2)]
    aux = torch.from_numpy(public.training_images(samples, ["t1"]))
    t0 = time.perf_counter()
    learned = LearnedInversion(steps=300).fit(encoder, config, "t1", aux)
    fit_s = time.perf_counter() - t0
    batch = {k: v.expand(args.learned_batch, *v.shape[1:]).contiguous() for k, v in obs.activations.items()}
    learned(Observation(config=config, site="t1", activations=batch))  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = learned(Observation(config=config, site="t1", activations=batch))
        times.append((time.perf_counter() - t0) / args.learned_batch)
    ssim = brain_ssim(out[0, 0].numpy(), x[0, 0])
    print(f"learned inversion: {1000 * float(np.median(times)):.1f} ms per slice (batch {args.learned_batch}, "
          f"target <= 50 ms), brain SSIM {ssim:.3f}; decoder training (one-off, {aux.shape[0]} public slices, "
          f"300 steps): {fit_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
