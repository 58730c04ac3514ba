"""The site side of the one-step-delayed (pipelined) schedule: two training steps in flight per run.

With ``step_schedule = delayed`` the aggregator asks for the forward of step ``t + 1`` before it returns step
``t``'s gradients, so the sites compute ``t + 1`` while the aggregator runs its decoder (PipeDream-style)::

    aggregator:  forward t+1 ─┐   decoder step t   (t+1 answered)   backward t ─┐
    site k:                   └─> encoder(x_{t+1}; W_{t-1})                     └─> W_t = W_{t-1} - update(g_t)

A training forward runs on the weights the site holds when it arrives. The aggregator sends the backward of
``t`` only once every site answered the forward of ``t + 1`` (:mod:`services.aggregator.pipeline`), so in the
pipeline the forward of ``s`` runs on ``W_{s-2}`` and the update of step ``s`` applies the gradient taken there::

    W_s = W_{s-1} - update(dL_s/dW evaluated at W_{s-2})          (one-step-delayed gradient)

and after a drain (validation, checkpoint, privacy gate, roll-back) the next forward runs on the weights just
updated or restored, as in the synchronous schedule: a run is reproducible, and a roll-back to a checkpoint
replays exactly what the uninterrupted run did. The forward of ``s`` runs on a detached copy of the parameters
(``torch.func.functional_call``), because the optimizer's in-place update of ``s - 1`` would otherwise invalidate
``s``'s autograd graph; at the backward the gradient with respect to the copy is put on the live parameters and the
optimizer steps.

A backward must answer the oldest forward in flight; a third training forward, or one for an earlier step than
the newest in flight, is refused (:class:`~splitunet.errors.ProtocolError`, 409). A new forward of the newest step
replaces it (on the same weights), as in the synchronous schedule. Evaluation forwards use the live weights and
leave the steps alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from splitunet.errors import ProtocolError
from splitunet.protocol import Bundle, SiteStep, _Pending, unmatched_backward

#: Training steps a site keeps in flight under the delayed schedule (the step being answered and the next).
MAX_IN_FLIGHT = 2


@dataclass
class _InFlight(_Pending):
    #: the detached parameter copies (leaves) the forward ran on, by parameter name
    params: dict[str, torch.Tensor] | None = None


class DelayedSiteStep(SiteStep):
    """A :class:`~splitunet.protocol.SiteStep` that keeps up to :data:`MAX_IN_FLIGHT` training steps in flight
    (same arguments). Thread-safe: one lock serialises forward/backward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight: deque[_InFlight] = deque()

    def forward(
        self,
        x: torch.Tensor,
        *,
        step: int,
        run_id: str = "local",
        train: bool = True,
        groups: Sequence[str] | None = None,
        sample_rate: float | None = None,
    ) -> Bundle:
        """Run the encoder on ``x`` (``B, C_site, *spatial``); a training forward runs on a copy of the weights
        held now and stays in flight until its backward (see the module docstring)."""
        if not train:
            return super().forward(x, step=step, run_id=run_id, train=False, groups=groups, sample_rate=sample_rate)
        with self.lock:
            replaced = self._admit(run_id, step)
            context = self._context(run_id, step, True, groups, sample_rate)
            if replaced is not None and replaced.params is not None:
                source = {n: p.detach() for n, p in replaced.params.items()}
            else:
                source = {n: p.detach() for n, p in self.encoder.named_parameters()}
            live = dict(self.encoder.named_parameters())
            params = {n: t.clone().requires_grad_(live[n].requires_grad) for n, t in source.items()}
            self.encoder.train()
            outputs = functional_call(self.encoder, params, (x,))
            extra = [term(x, outputs, context) for term in self.loss_terms]
            tape = self.filters.apply({k: v.detach() for k, v in outputs.items()}, context)
            self._in_flight.append(_InFlight(run_id, step, outputs, tape, extra, params=params))
            return tape.outputs

    def _admit(self, run_id: str, step: int) -> _InFlight | None:
        """Make room for a training forward of ``step`` (returning the forward of that step it replaces, if any)
        or raise :class:`ProtocolError` (409)."""
        steps = [p.step for p in self._in_flight]
        if self._in_flight and (self._in_flight[-1].run_id, steps[-1]) == (run_id, step):
            return self._in_flight.pop()  # a new forward of the newest step replaces it, on the same weights
        if self._in_flight and (self._in_flight[-1].run_id != run_id or step < steps[-1]):
            raise ProtocolError(
                f"forward for step {step} of run {run_id!r} arrives after step {steps[-1]}; the delayed schedule "
                "takes steps in increasing order",
                detail={"in_flight": steps, "step": step},
            )
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            raise ProtocolError(
                f"steps {steps} of run {run_id!r} await their backward; the delayed schedule keeps at most "
                f"{MAX_IN_FLIGHT} steps in flight: send the backward of step {steps[0]} first",
                detail={"in_flight": steps, "step": step, "max_in_flight": MAX_IN_FLIGHT},
            )
        return None

    def backward(self, gradients: Mapping[str, torch.Tensor], *, step: int, run_id: str = "local") -> None:
        """Backpropagate ``gradients`` of the oldest step in flight into the copy it ran on, put that gradient on
        the live parameters and step the optimizer.

        Raises:
            ProtocolError: ``step`` is not the oldest training forward in flight for ``run_id``.
            WireFormatError: gradient names or shapes differ from the tensors sent.
        """
        with self.lock:
            pending = self._in_flight[0] if self._in_flight else None
            if pending is None or pending.run_id != run_id or pending.step != step:
                raise unmatched_backward(pending, run_id, step, "the oldest training forward in flight",
                                         "send the backwards in the order of the forwards")
            outputs, grads = pending.roots(gradients)
            assert pending.params is not None
            leaves = {n: p for n, p in pending.params.items() if p.requires_grad}
            found = torch.autograd.grad(outputs, list(leaves.values()), grads, allow_unused=True)
            live = dict(self.encoder.named_parameters())
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            for name, grad in zip(leaves, found, strict=True):
                if grad is None:
                    continue
                param = live[name]
                param.grad = grad if param.grad is None else param.grad + grad
            if self.optimizer is not None:
                self.optimizer.step()
            self._in_flight.popleft()

    def pending_step(self) -> tuple[str, int] | None:
        """``(run_id, step)`` of the oldest forward awaiting its backward, if any."""
        p = self._in_flight[0] if self._in_flight else None
        return None if p is None else (p.run_id, p.step)

    def in_flight(self) -> list[int]:
        """Steps whose training forward awaits its backward, oldest first."""
        return [p.step for p in self._in_flight]

    def pending_shapes(self, run_id: str, step: int) -> dict[str, tuple[int, ...]] | None:
        """Shapes of the tensors sent by the forward that the next backward must answer, if it is ``step``'s."""
        p = self._in_flight[0] if self._in_flight else None
        if p is None or (p.run_id, p.step) != (run_id, step):
            return None
        return {k: tuple(v.shape) for k, v in p.outputs.items()}

    def discard_pending(self) -> None:
        """Forget every step in flight (a roll-back to a checkpoint)."""
        with self.lock:
            self._in_flight.clear()
