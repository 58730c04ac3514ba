"""Quantisation of outbound tensors: fp16, or int8 / int4 levels with one symmetric scale per tensor.

``int8``: ``scale = max|F| / 127``, ``F -> round(F / scale) * scale`` (error at most ``scale / 2``); ``int4`` the
same with 7 levels each side. The wire still carries floats (the run's wire dtype); the zstd wire compression
captures part of the bandwidth saving. Gradients pass straight through (the straight-through estimator), which
is the chain's default, so no backward hook is needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitunet.defenses.base import Stats
from splitunet.defenses.config import QuantizeConfig, QuantMode
from splitunet.filters import FilterContext

#: Largest integer level each side of zero.
LEVELS = {QuantMode.INT8: 127, QuantMode.INT4: 7}


def quantize_tensor(t: torch.Tensor, mode: QuantMode) -> tuple[torch.Tensor, float]:
    """The quantised tensor (same dtype) and the quantisation step (0 for fp16)."""
    if mode == QuantMode.FP16:
        return t.to(torch.float16).to(t.dtype), 0.0
    levels = LEVELS[mode]
    peak = float(t.detach().abs().max()) if t.numel() else 0.0
    if peak == 0.0:
        return t.clone(), 0.0
    scale = peak / levels
    q = torch.clamp(torch.round(t / scale), -levels, levels)
    return (q * scale).to(t.dtype), scale


class Quantize:
    """The quantisation defense (see the module docstring)."""

    name = "quantize"

    def __init__(self, config: QuantizeConfig) -> None:
        self.config = config
        self._stats = Stats(calls=0.0, step=0.0)

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        out, steps = {}, []
        for name, t in tensors.items():
            out[name], step = quantize_tensor(t, self.config.mode)
            steps.append(step)
        self._stats.add(calls=1)
        self._stats.update(step=max(steps))
        return out

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "mode": self.config.mode.value, "scale": "per tensor, symmetric"}

    def stats(self) -> dict[str, float]:
        return self._stats.snapshot()
