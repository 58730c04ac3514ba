"""Top-k sparsification: keep the ``keep`` fraction of largest-magnitude entries of every sample's tensor.

For a tensor ``B, C, *spatial`` each sample keeps exactly ``k = ceil(keep * C * prod(spatial))`` entries (ties
broken by ``torch.topk``), the rest are zero. On the gradient's way back only the kept entries pass: the
backward hook recomputes the mask from the filter's input and multiplies the gradient by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from splitunet.defenses.base import Stats
from splitunet.defenses.config import TopKConfig
from splitunet.filters import FilterContext


def topk_mask(t: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask ``like t`` with exactly ``ceil(keep * entries per sample)`` True entries per sample."""
    flat = t.detach().flatten(1)
    k = max(1, math.ceil(keep * flat.shape[1]))
    index = flat.abs().topk(k, dim=1, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)
    return mask.view_as(t)


class TopK:
    """The top-k defense (see the module docstring)."""

    name = "topk"

    def __init__(self, config: TopKConfig) -> None:
        self.config = config
        self._stats = Stats(calls=0.0, fraction_kept=0.0)

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        out, kept, total = {}, 0, 0
        for name, t in tensors.items():
            mask = topk_mask(t, self.config.keep)
            out[name] = t * mask
            kept, total = kept + int(mask.sum()), total + mask.numel()
        self._stats.add(calls=1)
        self._stats.update(fraction_kept=kept / max(total, 1))
        return out

    def backward(
        self, gradients: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor], context: FilterContext
    ) -> dict[str, torch.Tensor]:
        return {k: g * topk_mask(inputs[k], self.config.keep).to(g.device) for k, g in gradients.items()}

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "keep": self.config.keep}

    def stats(self) -> dict[str, float]:
        return self._stats.snapshot()
