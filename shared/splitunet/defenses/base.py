"""What the defenses share: calibration statistics, per-patient norms, seeded noise and thread-safe stats.

Tensors are ``{name: B, C, *spatial}`` bundles; "per sample" means per index of the batch axis.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Mapping, Sequence

import torch

#: Largest number of entries a percentile is computed on exactly; bigger tensors use an even subsample.
PERCENTILE_MAX_ENTRIES = 1 << 22


def abs_percentile(tensor: torch.Tensor, q: float = 95.0) -> float:
    """The ``q``-th percentile of ``|tensor|`` (nearest rank), on at most :data:`PERCENTILE_MAX_ENTRIES` entries."""
    flat = tensor.detach().abs().flatten().float()
    if flat.numel() > PERCENTILE_MAX_ENTRIES:
        flat = flat[:: math.ceil(flat.numel() / PERCENTILE_MAX_ENTRIES)]
    k = max(1, min(flat.numel(), math.ceil(q / 100.0 * flat.numel())))
    return float(flat.kthvalue(k).values)


def per_sample_sq_norms(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of every sample over all tensors of a bundle: ``B`` float32."""
    total = None
    for t in tensors.values():
        sq = t.detach().float().flatten(1).pow(2).sum(dim=1)
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("an empty bundle has no per-sample norm")
    return total


def group_clip_factors(
    tensors: Mapping[str, torch.Tensor], clip: float, groups: Sequence[str] | None
) -> tuple[torch.Tensor, int, int]:
    """Per-sample factors ``min(1, clip / ||patient||)`` (``B``), the patients clipped and the patients seen.

    A patient's norm is taken jointly over all its samples of the batch (``groups`` names the patient of each
    sample; ``None``: every sample is its own patient), so a patient contributes at most ``clip`` in L2 norm.
    """
    sq = per_sample_sq_norms(tensors)
    batch = sq.shape[0]
    if groups is None:
        groups = [str(i) for i in range(batch)]
    if len(groups) != batch:
        raise ValueError(f"groups name {len(groups)} patients for a batch of {batch} samples; give one per sample")
    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(g, len(index)) for g in groups], device=sq.device)
    patient_sq = torch.zeros(len(index), device=sq.device).index_add_(0, ids, sq)
    patient_factor = torch.clamp(clip / (patient_sq.sqrt() + 1e-12), max=1.0)
    clipped = int((patient_factor < 1.0).sum())
    return patient_factor[ids], clipped, len(index)


def scale_samples(tensors: Mapping[str, torch.Tensor], factors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Multiply sample ``b`` of every tensor by ``factors[b]``."""
    out = {}
    for name, t in tensors.items():
        shape = (t.shape[0],) + (1,) * (t.ndim - 1)
        out[name] = t * factors.to(t.device, t.dtype).view(shape)
    return out


class NoiseSource:
    """Seeded noise per device; secret (OS entropy) seed unless one is given for reproducible tests.

    The aggregator must not be able to predict a site's noise, so production filters leave ``seed`` unset.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._lock = threading.Lock()

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[key] = g
        return g

    def gaussian(self, like: torch.Tensor, std: float) -> torch.Tensor:
        """``N(0, std^2)`` noise shaped like ``like`` (float32 on its device)."""
        with self._lock:
            noise = torch.randn(like.shape, generator=self._generator(like.device), device=like.device)
        return noise * std

    def laplace(self, like: torch.Tensor, scale: float) -> torch.Tensor:
        """``Laplace(0, scale)`` noise shaped like ``like`` (inverse CDF of a uniform draw)."""
        with self._lock:
            u = torch.rand(like.shape, generator=self._generator(like.device), device=like.device)
        u = (u - 0.5).clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


class Stats:
    """Thread-safe counters and last values of one defense, for job status and ``/metrics``."""

    def __init__(self, **initial: float) -> None:
        self._values: dict[str, float] = dict(initial)
        self._lock = threading.Lock()

    def update(self, **values: float) -> None:
        with self._lock:
            self._values.update(values)

    def add(self, **increments: float) -> None:
        with self._lock:
            for k, v in increments.items():
                self._values[k] = self._values.get(k, 0.0) + v

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)
