"""The seam for defense middleware on tensor bundles that cross the site/aggregator boundary.

A filter has the shape of MONAI's FL ``Filter`` and Flower's mods: it takes the named tensors about to leave a
party and returns the tensors to send, ``filter(tensors, context) -> tensors``. The party whose data a filter
protects chooses and runs it: a site filters its outbound activations, the aggregator its outbound gradients.
Filters compose as a :class:`FilterChain` in the order given by the settings, at training and at evaluation.

The gradient's way back (site activation filters only)::

    forward:   F --f1--> F1 --f2--> F2 (sent)             FilterChain.apply -> FilterTape (keeps f_i's inputs)
    backward:  dL/dF <--f1.backward-- dL/dF1 <--f2.backward-- dL/dF2 (received)      FilterTape.backward

A filter may define the one optional hook ``backward(gradients, inputs, context) -> gradients``: the gradient
with respect to its output in, the gradient with respect to its input out, given the inputs it filtered in that
forward (top-k routes the gradient only through the kept entries; DP clipping scales it by the clip factor).
A filter without the hook passes the gradient *straight through* (exact for additive noise, the usual
estimator for quantisation). :class:`FilterChain` is the only place that runs filters and their hooks.

Concrete defenses live in :mod:`splitunet.defenses`; this module only defines the contract.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    """Where a bundle is in the protocol: run id, step, site, direction, phase (``train`` or ``eval``).

    ``groups`` (optional) names the patient of every sample of the batch (``B`` case ids): a filter that bounds a
    patient's contribution (DP) clips per patient. ``sample_rate`` (optional) is the probability that a given
    patient is in this training batch under the plan the aggregator declared (for privacy accounting).
    """

    run_id: str
    step: int
    site: str
    direction: Direction
    phase: str = "train"
    groups: tuple[str, ...] | None = field(default=None, compare=False)
    sample_rate: float | None = None


@runtime_checkable
class TensorFilter(Protocol):
    """A defense on an outbound bundle. Tensors are ``{name: B, C, *spatial}``; the result has the same names
    and shapes. A filter must not modify its input in place.

    Optional hook (see the module docstring)::

        def backward(self, gradients, inputs, context) -> dict[str, torch.Tensor]
    """

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        ...


@dataclass
class FilterTape:
    """What one chain application produced: the filtered tensors, and per filter with a ``backward`` hook the
    inputs it saw, so that :meth:`backward` can carry the gradient back through the chain."""

    outputs: dict[str, torch.Tensor]
    context: FilterContext
    _saved: list[tuple[object, dict[str, torch.Tensor]]] = field(default_factory=list, repr=False)

    def backward(self, gradients: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``dL/d outputs`` -> ``dL/d chain input``, running the filters' hooks in reverse order."""
        grads = dict(gradients)
        for f, inputs in reversed(self._saved):
            result = f.backward(grads, inputs, self.context)  # type: ignore[attr-defined]
            if set(result) != set(grads) or any(result[k].shape != grads[k].shape for k in grads):
                raise ValueError(f"the backward hook of {f!r} changed the names or shapes of the gradients")
            grads = dict(result)
        return grads


class FilterChain:
    """Filters applied in order; an empty chain is the identity."""

    def __init__(self, filters: Sequence[TensorFilter] = ()) -> None:
        for f in filters:
            if not callable(f):
                raise TypeError(f"filters must be callables (tensors, context) -> tensors, got {f!r}")
            hook = getattr(f, "backward", None)
            if hook is not None and not callable(hook):
                raise TypeError(f"{f!r}.backward must be a method (gradients, inputs, context) -> gradients")
        self.filters = tuple(filters)

    def __bool__(self) -> bool:
        return bool(self.filters)

    def __call__(self, tensors: Mapping[str, torch.Tensor], context: FilterContext) -> dict[str, torch.Tensor]:
        return self.apply(tensors, context, keep_inputs=False).outputs

    def apply(
        self, tensors: Mapping[str, torch.Tensor], context: FilterContext, *, keep_inputs: bool = True
    ) -> FilterTape:
        """Run the chain; with ``keep_inputs`` the tape keeps what the backward hooks need."""
        out = dict(tensors)
        tape = FilterTape(outputs=out, context=context)
        for f in self.filters:
            if keep_inputs and getattr(f, "backward", None) is not None:
                tape._saved.append((f, out))
            result = f(out, context)
            if set(result) != set(out) or any(result[k].shape != out[k].shape for k in out):
                raise ValueError(f"filter {f!r} changed the names or shapes of the bundle; filters must keep both")
            out = dict(result)
        tape.outputs = out
        return tape

    def describe(self) -> list[str]:
        """Human-readable names of the filters, for ``info`` endpoints."""
        return [getattr(f, "name", type(f).__name__) for f in self.filters]

    def stats(self) -> list[dict[str, object]]:
        """What each filter did so far (``{"name": ..., **filter.stats()}``); filters without stats give names."""
        report = []
        for f in self.filters:
            stats = getattr(f, "stats", None)
            report.append({"name": getattr(f, "name", type(f).__name__), **(stats() if callable(stats) else {})})
        return report
