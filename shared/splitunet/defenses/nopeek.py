"""NoPeek (Vepakomma et al. 2020; Titcombe et al. 2021): the site adds ``alpha * dCor(x, F)`` to its own loss.

Distance correlation between what a site reads (``x``) and what it sends (``F``) is NoPeek's leakage measure;
minimising it alongside the task pushes the encoder to send features from which ``x`` is hard to recover.
This is not an outbound filter: it needs ``x`` and the graph at ``backward``, so it plugs into
:class:`~splitunet.protocol.SiteStep` as a *site loss term* (``term(x, outputs, context) -> scalar``).

dCor needs many points, and a 3D batch may hold a single patch. So the points are patches: ``x`` (``B, C, *S``)
is cut into a grid of ``patch``-voxel cubes (squares in 2D), each sent tensor ``level{l}`` (``B, C_l, *S/2**l``)
into the matching cells of ``patch / 2**l`` voxels, and ``points`` random cells of the batch give the pairs
``(x patch, F patch)`` whose dCor is taken; the term is the mean over the sent tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from splitunet.defenses.base import Stats
from splitunet.defenses.config import NoPeekConfig


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Székely et al. 2007) of ``x`` (``n, p``) and ``y`` (``n, q``), differentiable.

    Returns a scalar in ``[0, 1]``: 0 for independent samples (in the limit), 1 for ``y`` a similarity of ``x``.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"dCor needs the same number (>= 2) of points in x and y, got {x.shape[0]} and {y.shape[0]}")

    def centred(z: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
        return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()

    a, b = centred(x.float()), centred(y.float())
    dcov2 = (a * b).mean()
    denom = ((a * a).mean() * (b * b).mean()).sqrt().clamp_min(1e-12)
    return (dcov2 / denom).clamp_min(1e-12).sqrt()


def patches(t: torch.Tensor, edge: int) -> torch.Tensor:
    """Cut ``B, C, *S`` into non-overlapping ``edge``-voxel cells: ``(B * cells), C * edge**d`` (remainder dropped)."""
    spatial = t.shape[2:]
    grid = [s // edge for s in spatial]
    if any(g == 0 for g in grid):
        raise ValueError(f"a patch of {edge} voxels does not fit a tensor of spatial size {tuple(spatial)}")
    t = t[(slice(None), slice(None), *(slice(0, g * edge) for g in grid))]
    shape = [t.shape[0], t.shape[1]]
    for g in grid:
        shape += [g, edge]
    t = t.reshape(shape)
    d = len(grid)
    grid_axes = [3 + 2 * i - 1 for i in range(d)]  # positions of the g's
    edge_axes = [3 + 2 * i for i in range(d)]
    t = t.permute(0, *grid_axes, 1, *edge_axes)
    return t.reshape(t.shape[0] * math.prod(grid), -1)


def bundle_dcor(
    x: torch.Tensor,
    outputs: Mapping[str, torch.Tensor],
    *,
    patch: int = 8,
    points: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean dCor between input patches and the matching patches of every sent tensor (see module docstring)."""
    values = []
    for name, f in outputs.items():
        factor = x.shape[-1] // f.shape[-1]
        edge = max(patch, factor)
        xp = patches(x, edge)
        fp = patches(f, edge // factor)
        n = min(xp.shape[0], fp.shape[0])
        index = torch.randperm(n, generator=generator)[: min(points, n)].to(x.device)
        values.append(distance_correlation(xp[index], fp[index]))
        del name
    return torch.stack(values).mean()


class NoPeek:
    """The site loss term ``alpha * dCor(x, F)``."""

    name = "nopeek"

    def __init__(self, config: NoPeekConfig) -> None:
        self.config = config
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        self._stats = Stats(calls=0.0, dcor=0.0)

    def __call__(self, x: torch.Tensor, outputs: Mapping[str, torch.Tensor], context: object = None) -> torch.Tensor:
        dcor = bundle_dcor(x, outputs, patch=self.config.patch, points=self.config.points, generator=self.generator)
        self._stats.add(calls=1)
        self._stats.update(dcor=float(dcor.detach()))
        return self.config.alpha * dcor

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "alpha": self.config.alpha, "patch": self.config.patch,
                "points": self.config.points}

    def stats(self) -> dict[str, float]:
        return self._stats.snapshot()
