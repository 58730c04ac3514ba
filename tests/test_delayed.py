"""The delayed schedule's site step (:mod:`splitunet.delayed`): the update it applies is the one-step-delayed
gradient, whatever the order in which the next forward and the backward arrive; out-of-order calls are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from splitunet.config import SiteSpec, SplitUNetConfig
from splitunet.delayed import MAX_IN_FLIGHT, DelayedSiteStep
from splitunet.errors import ProtocolError
from splitunet.networks.factory import make_site_encoder
from splitunet.protocol import SiteStep, expected_site_shapes

LR = 0.05
ROI = (16, 16)
CONFIG = SplitUNetConfig(spatial_dims=2, features=(4, 8, 16), cut_level=1,
                         sites=(SiteSpec(name="t1", modalities=("t1",)), SiteSpec(name="t2", modalities=("t2",))))
STEPS = 4


def batch(step: int) -> torch.Tensor:
    return torch.randn(2, 1, *ROI, generator=torch.Generator().manual_seed(100 + step))


def grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return {k: torch.randn(s, generator=g) for k, s in expected_site_shapes(CONFIG, 2, ROI).items()}


def gradient_at(encoder: torch.nn.Module, weights: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """d/dW of ``sum_k <encoder_W(x_step)[k], G_step[k]>`` at ``weights``: the gradient a backward of ``G_step``
    carries into the encoder."""
    model = copy.deepcopy(encoder)
    model.load_state_dict(weights)
    model.train()
    outputs = model(batch(step))
    surrogate = sum((outputs[k] * g).sum() for k, g in grads(step).items())
    params = dict(model.named_parameters())
    found = torch.autograd.grad(surrogate, list(params.values()))
    return {n: g for n, g in zip(params, found, strict=True)}


def delayed_step() -> DelayedSiteStep:
    encoder = make_site_encoder(CONFIG, "t1", seed=3)
    return DelayedSiteStep(encoder, torch.optim.SGD(encoder.parameters(), lr=LR))


ORDERS = {
    # the next forward before the backward (the aggregator's pipeline) ...
    "pipelined": [("f", 1), ("f", 2), ("b", 1), ("f", 3), ("b", 2), ("f", 4), ("b", 3), ("b", 4)],
    # ... or after it (a drained pipeline, or a backward that overtook the forward): the same weights either way
    "lockstep": [("f", 1), ("b", 1), ("f", 2), ("b", 2), ("f", 3), ("b", 3), ("f", 4), ("b", 4)],
    "mixed": [("f", 1), ("f", 2), ("b", 1), ("b", 2), ("f", 3), ("f", 4), ("b", 3), ("b", 4)],
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_the_update_is_the_hand_computed_one_step_delayed_gradient(order: str) -> None:
    site = delayed_step()
    w = [{k: v.detach().clone() for k, v in site.encoder.state_dict().items()}]  # w[s]: after step s
    # by hand: W_s = W_{s-1} - lr * g_s(W_{s-2}), with W_{-1} = W_0
    for s in range(1, STEPS + 1):
        g = gradient_at(site.encoder, w[max(s - 2, 0)], s)
        w.append({k: w[s - 1][k] - LR * g[k] for k in w[s - 1]})

    for kind, s in ORDERS[order]:
        if kind == "f":
            site.forward(batch(s), step=s)
        else:
            site.backward(grads(s), step=s)
    got = site.encoder.state_dict()
    for name, want in w[STEPS].items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    # a control: the synchronous step lands elsewhere (the comparison sees the delay)
    sync_encoder = make_site_encoder(CONFIG, "t1", seed=3)
    sync = SiteStep(sync_encoder, torch.optim.SGD(sync_encoder.parameters(), lr=LR))
    for s in range(1, STEPS + 1):
        sync.forward(batch(s), step=s)
        sync.backward(grads(s), step=s)
    assert max((sync_encoder.state_dict()[k] - v).abs().max().item() for k, v in w[STEPS].items()) > 1e-4


def test_the_sent_activations_are_those_of_the_weights_two_updates_back() -> None:
    site = delayed_step()
    w0 = {k: v.detach().clone() for k, v in site.encoder.state_dict().items()}
    site.forward(batch(1), step=1)
    site.backward(grads(1), step=1)  # W_1 applied; step 2 must still see W_0
    sent = site.forward(batch(2), step=2)
    reference = copy.deepcopy(site.encoder)
    reference.load_state_dict(w0)
    with torch.no_grad():
        want = reference(batch(2))
    for k, v in want.items():
        torch.testing.assert_close(sent[k], v)
    assert site.weights_for(2).keys() == w0.keys()


def test_a_third_step_in_flight_and_out_of_order_calls_are_refused() -> None:
    site = delayed_step()
    site.forward(batch(1), step=1)
    site.forward(batch(2), step=2)
    with pytest.raises(ProtocolError, match=f"at most {MAX_IN_FLIGHT} steps in flight") as third:
        site.forward(batch(3), step=3)
    assert third.value.detail["in_flight"] == [1, 2]
    with pytest.raises(ProtocolError, match="oldest training forward"):
        site.backward(grads(2), step=2)  # step 1 first
    with pytest.raises(ProtocolError, match="increasing order"):
        site.forward(batch(1), step=1)
    assert site.in_flight() == [1, 2]  # nothing was lost
    site.backward(grads(1), step=1)
    site.backward(grads(2), step=2)
    assert site.pending_step() is None
    with pytest.raises(ProtocolError):
        site.backward(grads(2), step=2)


def test_a_repeated_forward_of_the_newest_step_replaces_it_and_a_roll_back_forgets_every_step() -> None:
    site = delayed_step()
    site.forward(batch(1), step=1)
    site.backward(grads(1), step=1)
    first = site.forward(batch(2), step=2)
    again = site.forward(batch(2), step=2)  # same weights (W_0), not the live W_1
    for k in first:
        torch.testing.assert_close(again[k], first[k])
    assert site.in_flight() == [2]
    site.discard_pending()
    assert site.pending_step() is None and site.pending_shapes("local", 2) is None
    with pytest.raises(ProtocolError):
        site.backward(grads(2), step=2)
