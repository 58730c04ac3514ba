"""The split step protocol, in process: what the REST services carry, without HTTP.

One synchronous step::

    site k:      tensors_k = SiteStep.forward(x_k, step)          # detached leaves, {name: B, C, *spatial}
    aggregator:  result = AggregatorStep.step({k: tensors_k}, y)  # loss, {k: {name: dL/d tensors_k[name]}}
    site k:      SiteStep.backward(result.gradients[k], step)     # backprop into the encoder, optimizer step

In fp32 one step through this protocol equals one autograd pass through the fused
:class:`~splitunet.networks.SplitUNet` (tested). The tensors that leave a site are detached leaf tensors; the
gradients returned are exactly the gradient of the loss with respect to what was received (after the site's
outbound filters, see :mod:`splitunet.filters`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from splitunet.config import SplitUNetConfig, tensor_name
from splitunet.errors import ConfigurationError, ProtocolError, WireFormatError
from splitunet.filters import Direction, FilterChain, FilterContext, FilterTape
from splitunet.networks.split_unet import ServerDecoder, SiteEncoder

#: ``{name: tensor}`` of one site.
Bundle = dict[str, torch.Tensor]


def expected_site_shapes(
    config: SplitUNetConfig, batch_size: int, roi: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors one site sends for a batch: ``{"level{i}": (B, features[i], *roi / 2**i)}``."""
    roi = config.check_roi(roi)
    return {
        tensor_name(level): (batch_size, config.features[level], *(r // 2**level for r in roi))
        for level in config.sent_levels
    }


class SiteLossTerm(Protocol):
    """A site-side loss term added to the site's own update (NoPeek's ``alpha * dCor(x, F)``): a scalar computed
    from the input ``x`` (``B, C_site, *spatial``) and the graph-attached encoder outputs, backpropagated with the
    received gradients."""

    def __call__(self, x: torch.Tensor, outputs: Mapping[str, torch.Tensor], context: FilterContext) -> torch.Tensor:
        ...


@runtime_checkable
class PatientOptimizer(Protocol):
    """An optimizer whose step needs the patient of every sample (DP-SGD clips per patient,
    :mod:`splitunet.defenses.dpsgd`). :class:`SiteStep` calls :meth:`begin` before each training forward and
    :meth:`step_for` with the forward's patients instead of ``step()``."""

    def begin(self) -> None:
        ...

    def step_for(self, groups: Sequence[str] | None) -> None:
        ...


@dataclass
class _Pending:
    run_id: str
    step: int
    outputs: dict[str, torch.Tensor]  # graph-attached encoder outputs
    tape: FilterTape | None = None  # what the outbound filters need on the gradient's way back
    extra_losses: list[torch.Tensor] = field(default_factory=list)  # site loss terms (graph-attached scalars)

    def roots(self, gradients: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Check ``gradients`` (``{name: dL/d sent tensor}``) against the outputs, carry them back through the
        filters' tape; return the graph's roots (outputs, then site loss terms) and their gradients."""
        check_bundle(gradients, {k: tuple(v.shape) for k, v in self.outputs.items()}, what="gradients")
        if self.tape is not None:
            gradients = self.tape.backward(gradients)
        names = list(self.outputs)
        outputs = [self.outputs[n] for n in names] + self.extra_losses
        grads = [gradients[n].to(dtype=outputs[i].dtype, device=outputs[i].device) for i, n in enumerate(names)]
        grads += [torch.ones_like(term) for term in self.extra_losses]
        return outputs, grads


class SiteStep:
    """The site side of the protocol: an encoder, its optimizer and the pending forward.

    Args:
        encoder: the site's :class:`SiteEncoder`.
        optimizer: the encoder's optimizer; ``None`` accumulates gradients without stepping (tests, audits).
        filters: outbound activation filters (defenses) of this site.
        loss_terms: site loss terms added to the site's update (NoPeek), training only.

    Thread-safe: one lock serialises forward/backward.
    """

    def __init__(
        self,
        encoder: SiteEncoder,
        optimizer: torch.optim.Optimizer | None = None,
        filters: FilterChain | None = None,
        loss_terms: Sequence[SiteLossTerm] = (),
    ) -> None:
        self.encoder = encoder
        self.optimizer = optimizer
        self.filters = filters or FilterChain()
        self.loss_terms = tuple(loss_terms)
        self._pending: _Pending | None = None
        self.lock = threading.Lock()

    @property
    def site(self) -> str:
        return self.encoder.site.name

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
        """Run the encoder on ``x`` (``B, C_site, *spatial``) and return the detached tensors to send.

        In training the graph is kept until :meth:`backward` for the same ``run_id`` and ``step``; a new training
        forward replaces an unanswered one. Evaluation runs without a graph and leaves the pending step alone.
        ``groups`` (the patient of each sample) and ``sample_rate`` go to the filters (see
        :class:`~splitunet.filters.FilterContext`).
        """
        with self.lock:
            context = self._context(run_id, step, train, groups, sample_rate)
            if not train:
                self.encoder.eval()
                with torch.no_grad():
                    outputs = self.encoder(x)
                return self.filters({k: v.detach() for k, v in outputs.items()}, context)
            self.encoder.train()
            if isinstance(self.optimizer, PatientOptimizer):
                self.optimizer.begin()
            outputs = self.encoder(x)
            extra = [term(x, outputs, context) for term in self.loss_terms]
            tape = self.filters.apply({k: v.detach() for k, v in outputs.items()}, context)
            self._pending = _Pending(run_id, step, outputs, tape, extra)
            return tape.outputs

    def _context(self, run_id: str, step: int, train: bool, groups: Sequence[str] | None,
                 sample_rate: float | None) -> FilterContext:
        return FilterContext(
            run_id, step, self.site, Direction.ACTIVATIONS, "train" if train else "eval",
            groups=None if groups is None else tuple(groups), sample_rate=sample_rate,
        )

    def backward(self, gradients: Mapping[str, torch.Tensor], *, step: int, run_id: str = "local") -> None:
        """Backpropagate ``gradients`` (``{name: dL/d sent tensor}``) into the encoder and step the optimizer.

        Raises:
            ProtocolError: no training forward is pending for this ``run_id`` and ``step``.
            WireFormatError: gradient names or shapes differ from the tensors sent.
        """
        with self.lock:
            pending = self._pending
            if pending is None or pending.run_id != run_id or pending.step != step:
                raise unmatched_backward(pending, run_id, step, "the last training forward",
                                         "call forward for this step first")
            outputs, grads = pending.roots(gradients)
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(outputs, grads)
            if isinstance(self.optimizer, PatientOptimizer):
                self.optimizer.step_for(None if pending.tape is None else pending.tape.context.groups)
            elif self.optimizer is not None:
                self.optimizer.step()
            self._pending = None

    def pending_step(self) -> tuple[str, int] | None:
        """``(run_id, step)`` of the forward awaiting its backward, if any."""
        p = self._pending
        return None if p is None else (p.run_id, p.step)

    def pending_shapes(self, run_id: str, step: int) -> dict[str, tuple[int, ...]] | None:
        """Shapes of the tensors sent by the forward that the next backward must answer, if it is ``step``'s."""
        p = self._pending
        if p is None or (p.run_id, p.step) != (run_id, step):
            return None
        return {k: tuple(v.shape) for k, v in p.outputs.items()}

    def discard_pending(self) -> None:
        """Forget the pending forward (a roll-back to a checkpoint)."""
        with self.lock:
            self._pending = None


@dataclass
class StepResult:
    """What one aggregator step produced: the loss, the gradient per site and tensor, and the logits."""

    loss: float
    gradients: dict[str, Bundle]
    logits: torch.Tensor = field(repr=False)


class AggregatorStep:
    """The label holder's side: fusion, decoder, loss and the gradients returned to the sites.

    Args:
        decoder: the :class:`ServerDecoder`.
        loss_fn: ``loss_fn(logits, labels) -> scalar``; logits and labels are ``B, 3, *spatial``.
        optimizer: the decoder's optimizer; ``None`` accumulates gradients without stepping.
        filters: outbound gradient filters (defenses against label leakage).
        inbound: turns the received bundles into the ones the decoder fuses, before training and prediction
            (secure sum: masked bundles in, their unmasked sum out; see :mod:`splitunet.secure_sum`).
    """

    def __init__(
        self,
        decoder: ServerDecoder,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        filters: FilterChain | None = None,
        inbound: Callable[[Mapping[str, Mapping[str, torch.Tensor]]], Mapping[str, Mapping[str, torch.Tensor]]]
        | None = None,
    ) -> None:
        self.decoder = decoder
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.filters = filters or FilterChain()
        self.inbound = inbound
        self.lock = threading.Lock()

    def _leaves(self, site_tensors: Mapping[str, Mapping[str, torch.Tensor]], grad: bool,
                sites: Sequence[str] | None = None) -> dict[str, Bundle]:
        config = self.decoder.config
        names = [s.name for s in config.sites] if sites is None else check_present(config, sites)
        if self.inbound is not None:
            if len(names) != config.num_sites:
                raise ConfigurationError(
                    f"secure sum needs every site (its masks cancel only over the full set); got {names}",
                    detail={"sites": names},
                )
            site_tensors = self.inbound(site_tensors)
        if set(site_tensors) != set(names):
            raise WireFormatError(f"expected tensors from sites {names}, got {sorted(site_tensors)}")
        reference = next(iter(site_tensors.values()))
        shapes = {k: tuple(v.shape) for k, v in reference.items()}
        device = next(self.decoder.parameters()).device
        leaves: dict[str, Bundle] = {}
        for site in names:
            check_bundle(site_tensors[site], shapes, what=f"activations of site {site!r}")
            leaves[site] = {
                k: v.detach().to(device, torch.float32).requires_grad_(grad) for k, v in site_tensors[site].items()
            }
        return leaves

    def step(
        self,
        site_tensors: Mapping[str, Mapping[str, torch.Tensor]],
        labels: torch.Tensor,
        *,
        step: int = 0,
        run_id: str = "local",
        groups: Sequence[str] | None = None,
        sites: Sequence[str] | None = None,
    ) -> StepResult:
        """One training step on the received tensors and ``labels`` (``B, 3, *spatial``, float 0/1).

        ``sites``: the sites taking part (``None``: every site); the others are absent from the step (site
        dropout, a site that stopped answering) and get no gradient. Received tensors are moved to the decoder's
        device; the gradients returned live there too. ``groups`` (the patient of each sample) goes to the gradient
        filters (label DP clips per patient).
        """
        with self.lock:
            leaves = self._leaves(site_tensors, grad=True, sites=sites)
            self.decoder.train()
            logits = self.decoder(leaves)
            loss = self.loss_fn(logits, labels)
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.optimizer is not None:
                self.optimizer.step()
            gradients: dict[str, Bundle] = {}
            for site, bundle in leaves.items():
                grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in bundle.items()}
                context = FilterContext(run_id, step, site, Direction.GRADIENTS,
                                        groups=None if groups is None else tuple(groups))
                gradients[site] = self.filters(grads, context)
            return StepResult(loss=float(loss.detach()), gradients=gradients, logits=logits.detach())

    def predict(self, site_tensors: Mapping[str, Mapping[str, torch.Tensor]],
                sites: Sequence[str] | None = None) -> torch.Tensor:
        """Evaluation forward: logits ``B, 3, *spatial`` without a graph, from ``sites`` (``None``: every site)."""
        with self.lock:
            leaves = self._leaves(site_tensors, grad=False, sites=sites)
            self.decoder.eval()
            with torch.no_grad():
                return self.decoder(leaves)


def check_present(config: SplitUNetConfig, sites: Sequence[str]) -> list[str]:
    """``sites`` in the model's fusion order, checked: a non-empty set of the model's sites, no repeats."""
    names = [s.name for s in config.sites]
    unknown = sorted(set(sites) - set(names))
    if unknown or not sites or len(set(sites)) != len(sites):
        raise ConfigurationError(
            f"sites must be a non-empty subset of the model's sites {names}, without repeats; got {list(sites)}",
            detail={"sites": list(sites), "model_sites": names},
        )
    return [n for n in names if n in set(sites)]


def unmatched_backward(pending: _Pending | None, run_id: str, step: int, which: str, todo: str) -> ProtocolError:
    """The 409 for a backward of ``(run_id, step)`` that does not answer ``pending`` (``which`` forward it should
    answer, and ``todo``: what the caller should do)."""
    have = None if pending is None else {"run_id": pending.run_id, "step": pending.step}
    return ProtocolError(
        f"backward for run {run_id!r} step {step} does not match {which} ({'none' if have is None else have}); "
        f"{todo}",
        detail={"expected": have, "got": {"run_id": run_id, "step": step}},
    )


def check_bundle(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], *, what: str
) -> None:
    """Raise :class:`WireFormatError` unless ``tensors`` has exactly the names and shapes in ``shapes``."""
    if set(tensors) != set(shapes):
        raise WireFormatError(
            f"{what}: expected tensors {sorted(shapes)}, got {sorted(tensors)}",
            detail={"expected": sorted(shapes), "got": sorted(tensors)},
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise WireFormatError(
                f"{what}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}",
                detail={"tensor": name, "expected": list(shape), "got": list(tensors[name].shape)},
            )
