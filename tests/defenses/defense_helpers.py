"""Helpers shared by the defense tests."""

from __future__ import annotations

from typing import Any

from splitunet.config import MODALITIES, SiteSpec, SplitUNetConfig


def tiny_config(spatial_dims: int = 2, features: tuple[int, ...] = (4, 8, 16), **kwargs: Any) -> SplitUNetConfig:
    """A tiny Split-U-Net over four one-modality sites."""
    sites = tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES)
    return SplitUNetConfig(spatial_dims=spatial_dims, features=features, sites=sites, **kwargs)


def gaussian_rdp_epsilon(mechanisms: list[tuple[float, int]], delta: float, sensitivity: float = 2.0) -> float:
    """Epsilon of unsubsampled Gaussian mechanisms in closed form, independent of Opacus's code: each release with
    L2 sensitivity ``sensitivity * C`` and noise std ``z * C`` has RDP ``alpha * sensitivity^2 / (2 z^2)`` at order
    ``alpha`` (Mironov 2017); RDP adds over releases; converted with Balle et al. 2020, Theorem 21, minimised over
    the orders 1.01 .. 1000 (a finer grid than Opacus's default)."""
    import math

    orders = [1 + k / 100 for k in range(1, 1000)] + [float(a) for a in range(11, 1001)]
    best = math.inf
    for alpha in orders:
        rdp = sum(n * alpha * sensitivity**2 / (2 * z**2) for z, n in mechanisms)
        eps = rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
        best = min(best, eps)
    return best


def gdp_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of a ``mu``-GDP mechanism (Dong, Roth and Su 2019): the composition of
    Gaussian mechanisms without subsampling is ``mu``-GDP with ``mu = sqrt(sum_i n_i (sensitivity / z_i)^2)``;
    ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``, solved by bisection."""
    import math

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi
