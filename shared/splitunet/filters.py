"""The seam for defense middleware on tensor bundles that cross the site/aggregator boundary.

A filter has the shape of MONAI's FL ``Filter`` and Flower's mods: it takes the named tensors about to leave a
party and returns the tensors to send, ``filter(tensors, context) -> tensors``. The party whose data a filter
protects chooses and runs it: a site filters its outbound activations, the aggregator its outbound gradients.
Filters compose as a :class:`FilterChain` in the order given by the settings.

Gradients pass *straight through* a site's activation filters: the site backpropagates the gradient it receives
for the filtered tensor into the unfiltered one (exact for additive noise, the usual estimator otherwise).

Concrete defenses (noise, DP, quantisation, NoPeek, gradient protection) are separate modules built on this
protocol; this module only defines it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)


class Direction(StrEnum):
    """What a bundle carries: site activations (forward) or aggregator gradients (backward)."""

    ACTIVATIONS = "activations"
    GRADIENTS = "gradients"


@dataclass(frozen=True)
class FilterContext:
    """Where a bundle is in the protocol: run id, step, site, direction, phase (``train`` or ``eval``)."""

    run_id: str
    step: int
    site: str
    direction: Direction
    phase: str = "train"


@runtime_checkable
class TensorFilter(Protocol):
    """A defense on an outbound bundle. Tensors are ``{name: B, C, *spatial}``; the result has the same names
    and shapes. A filter must not modify its input in place."""

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        ...


class FilterChain:
    """Filters applied in order; an empty chain is the identity."""

    def __init__(self, filters: Sequence[TensorFilter] = ()) -> None:
        for f in filters:
            if not callable(f):
                raise TypeError(f"filters must be callables (tensors, context) -> tensors, got {f!r}")
        self.filters = tuple(filters)

    def __bool__(self) -> bool:
        return bool(self.filters)

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for f in self.filters:
            result = f(out, context)
            if set(result) != set(out) or any(result[k].shape != out[k].shape for k in out):
                raise ValueError(f"filter {f!r} changed the names or shapes of the bundle; filters must keep both")
            out = dict(result)
        return out

    def describe(self) -> list[str]:
        """Human-readable names of the filters, for ``info`` endpoints."""
        return [getattr(f, "name", type(f).__name__) for f in self.filters]
