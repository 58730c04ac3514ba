"""The delayed schedule's site step (:mod:`splitunet.delayed`): each update is the gradient at the weights its
forward ran on (the one-step-delayed gradient when the next forward comes ahead of the backward, the synchronous one
after a drain), checked against a hand computation; out-of-order calls are refused."""

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
    # the aggregator's pipeline: the next forward before the backward, drained after step 2
    "pipelined": [("f", 1), ("f", 2), ("b", 1), ("b", 2), ("f", 3), ("f", 4), ("b", 3), ("b", 4)],
    # never drained: every forward runs on W_{s-2}
    "always-ahead": [("f", 1), ("f", 2), ("b", 1), ("f", 3), ("b", 2), ("f", 4), ("b", 3), ("b", 4)],
    # drained after every step: the synchronous schedule
    "lockstep": [("f", 1), ("b", 1), ("f", 2), ("b", 2), ("f", 3), ("b", 3), ("f", 4), ("b", 4)],
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_the_update_is_the_hand_computed_gradient_at_the_weights_the_forward_saw(order: str) -> None:
    site = delayed_step()
    # by hand: W_s = W_{s-1} - lr * g_s(W_seen(s)), W_seen(s) = the weights held when forward s arrived
    w = [{k: v.detach().clone() for k, v in site.encoder.state_dict().items()}]  # w[s]: after step s
    seen: dict[int, int] = {}
    for kind, s in ORDERS[order]:
        if kind == "f":
            seen[s] = len(w) - 1
        else:
            g = gradient_at(site.encoder, w[seen[s]], s)
            w.append({k: w[-1][k] - LR * g[k] for k in w[-1]})
    if order == "always-ahead":
        assert seen == {1: 0, 2: 0, 3: 1, 4: 2}  # the one-step-delayed gradient: W_{s-2}
    if order == "lockstep":
        assert seen == {1: 0, 2: 1, 3: 2, 4: 3}

    for kind, s in ORDERS[order]:
        if kind == "f":
            site.forward(batch(s), step=s)
        else:
            site.backward(grads(s), step=s)
    got = site.encoder.state_dict()
    for name, want in w[STEPS].items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    # a control: the synchronous step lands elsewhere unless the order is the synchronous one
    sync_encoder = make_site_encoder(CONFIG, "t1", seed=3)
    sync = SiteStep(sync_encoder, torch.optim.SGD(sync_encoder.parameters(), lr=LR))
    for s in range(1, STEPS + 1):
        sync.forward(batch(s), step=s)
        sync.backward(grads(s), step=s)
    differs = max((sync_encoder.state_dict()[k] - v).abs().max().item() for k, v in w[STEPS].items())
    assert (differs < 1e-5) if order == "lockstep" else (differs > 1e-4), differs


def test_a_forward_ahead_sends_the_activations_of_the_weights_before_the_pending_update() -> None:
    site = delayed_step()
    w0 = {k: v.detach().clone() for k, v in site.encoder.state_dict().items()}
    site.forward(batch(1), step=1)
    sent = site.forward(batch(2), step=2)  # ahead of backward 1: W_0
    site.backward(grads(1), step=1)
    again = site.forward(batch(2), step=2)  # a repeated forward replaces step 2 on the same weights, not W_1
    reference = copy.deepcopy(site.encoder)
    reference.load_state_dict(w0)
    with torch.no_grad():
        want = reference(batch(2))
    for k, v in want.items():
        torch.testing.assert_close(sent[k], v)
        torch.testing.assert_close(again[k], v)
    assert site.in_flight() == [2]


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


def test_a_roll_back_forgets_every_step_in_flight() -> None:
    site = delayed_step()
    site.forward(batch(1), step=1)
    site.forward(batch(2), step=2)
    site.discard_pending()
    assert site.pending_step() is None and site.pending_shapes("local", 1) is None
    with pytest.raises(ProtocolError):
        site.backward(grads(1), step=1)
