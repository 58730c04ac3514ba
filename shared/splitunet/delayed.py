"""The site side of the one-step-delayed (pipelined) schedule: two training steps in flight per run.

With ``step_schedule = delayed`` the aggregator asks for the forward of step ``t + 1`` before it returns step
``t``'s gradients, so the sites compute ``t + 1`` while the aggregator runs its decoder (PipeDream-style)::

    aggregator:  forward t+1 ─┐   decoder step t   backward t ─┐
    site k:                   └─> encoder(x_{t+1}; W_{t-1})     └─> W_t = W_{t-1} - update(g_t)

The weights a forward uses do not depend on which request reaches the site first: the forward of step ``s`` always
runs on ``W_{s-2}``, the weights after the update of step ``s - 2``, and step ``s``'s update applies the gradient
taken there::

    W_s = W_{s-1} - update(dL_s/dW evaluated at W_{s-2})          (one-step-delayed gradient)

so a run is reproducible whatever the timing. A forward that arrives while step ``s - 1`` still awaits its
backward runs on a detached copy of the live parameters (``torch.func.functional_call``), because the optimizer's
in-place update of ``s - 1`` would otherwise invalidate ``s``'s autograd graph; a forward that arrives after that
backward runs on the copy of ``W_{s-2}`` the backward kept for it. At the backward the gradient with respect to the
copy is put on the live parameters and the optimizer steps.

A backward must answer the oldest forward in flight; a third training forward, or one for an earlier step than
the newest in flight, is refused (:class:`~splitunet.errors.ProtocolError`, 409). A new forward of the newest step
replaces it, as in the synchronous schedule. Evaluation forwards use the live weights and leave the steps alone.
After a roll-back (:meth:`DelayedSiteStep.discard_pending`) the next step runs on the restored weights.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from splitunet.errors import ProtocolError
from splitunet.protocol import Bundle, SiteStep, _Pending

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
        self._kept: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, W_{step-2}) for a late forward

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
        """Run the encoder on ``x`` (``B, C_site, *spatial``); training forwards run on ``W_{step-2}`` and stay
        in flight until their backward (see the module docstring)."""
        if not train:
            return super().forward(x, step=step, run_id=run_id, train=False, groups=groups, sample_rate=sample_rate)
        with self.lock:
            replaced = self._admit(run_id, step)
            context = self._context(run_id, step, True, groups, sample_rate)
            kept, self._kept = self._kept, None
            if replaced is not None and replaced.params is not None:
                source = {n: p.detach() for n, p in replaced.params.items()}
            elif kept is not None and kept[0] == step:
                source = kept[1]
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
                have = None if pending is None else {"run_id": pending.run_id, "step": pending.step}
                raise ProtocolError(
                    f"backward for run {run_id!r} step {step} does not match the oldest training forward in flight "
                    f"({'none' if have is None else have}); send the backwards in the order of the forwards",
                    detail={"expected": have, "got": {"run_id": run_id, "step": step}},
                )
            outputs, grads = pending.roots(gradients)
            assert pending.params is not None
            leaves = {n: p for n, p in pending.params.items() if p.requires_grad}
            found = torch.autograd.grad(outputs, list(leaves.values()), grads, allow_unused=True)
            live = dict(self.encoder.named_parameters())
            if len(self._in_flight) == 1:  # the next forward comes later: keep the weights it must run on
                self._kept = (step + 1, {n: p.detach().clone() for n, p in live.items()})
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

    def weights_for(self, step: int) -> dict[str, torch.Tensor]:
        """The encoder state a training forward of ``step`` would run on now (call under :attr:`lock`):
        ``W_{step-2}``, kept by the backward of ``step - 1`` if that came first, else the live weights."""
        state = self.encoder.state_dict()
        if self._kept is not None and self._kept[0] == step:
            state.update(self._kept[1])
        return state

    def discard_pending(self) -> None:
        """Forget every step in flight and the kept weights (a roll-back to a checkpoint)."""
        with self.lock:
            self._in_flight.clear()
            self._kept = None
