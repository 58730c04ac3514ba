"""Statistical tests of the activation defenses: noise scale, clipping, quantisation error, top-k routing."""

from __future__ import annotations

import math

import pytest
import torch
from defense_helpers import tiny_config

from splitunet.defenses.base import abs_percentile, per_sample_sq_norms
from splitunet.defenses.config import DPConfig, GaussianConfig, LaplaceConfig, QuantizeConfig, QuantMode, TopKConfig
from splitunet.defenses.dp import DPGaussian
from splitunet.defenses.noise import GaussianNoise, LaplaceNoise
from splitunet.defenses.quantize import Quantize
from splitunet.defenses.topk import TopK
from splitunet.filters import Direction, FilterChain, FilterContext
from splitunet.networks.factory import make_site_encoder
from splitunet.protocol import SiteStep

CTX = FilterContext("run", 1, "t1", Direction.ACTIVATIONS)


def features(seed: int = 0, shape=(4, 8, 32, 32)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"level0": torch.randn(shape, generator=g) * 3 + 1, "level1": torch.rand((4, 16, 16, 16), generator=g)}


def test_gaussian_noise_std_is_sigma0_times_p95_within_5_percent() -> None:
    x = features()
    out = GaussianNoise(GaussianConfig(sigma0=0.3, seed=1))(x, CTX)
    for name, t in x.items():
        sigma = 0.3 * abs_percentile(t)
        assert (out[name] - t).std().item() == pytest.approx(sigma, rel=0.05)
        assert (out[name] - t).mean().abs().item() < 0.05 * sigma


def test_laplace_noise_std_is_sqrt2_b_within_5_percent() -> None:
    x = features()
    out = LaplaceNoise(LaplaceConfig(b0=0.2, seed=2))(x, CTX)
    for name, t in x.items():
        assert (out[name] - t).std().item() == pytest.approx(math.sqrt(2) * 0.2 * abs_percentile(t), rel=0.05)


def test_the_p95_is_the_95th_percentile_of_magnitudes() -> None:
    t = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([-1.0, 1.0]).repeat(50)
    assert abs_percentile(t) == 95.0


def test_dp_clips_every_patient_to_c_and_adds_noise_of_std_z_c() -> None:
    x = features()
    tiny = DPGaussian(DPConfig(clip=5.0, noise_multiplier=1e-7, seed=0))
    out = tiny(x, CTX)
    norms = per_sample_sq_norms(out).sqrt()
    assert torch.all(norms <= 5.0 * (1 + 1e-4)), norms
    assert torch.all(norms >= 5.0 * (1 - 1e-4))  # these samples were all far above C: scaled onto the sphere
    # several samples of one patient share its bound C
    grouped = tiny(x, FilterContext("run", 2, "t1", Direction.ACTIVATIONS, groups=("a", "a", "b", "c")))
    assert per_sample_sq_norms(grouped)[:2].sum().sqrt() <= 5.0 * (1 + 1e-4)
    assert tiny.stats()["clip_rate"] == 1.0
    # small samples are left alone
    small = {k: v * 1e-3 for k, v in x.items()}
    kept = tiny(small, CTX)
    assert all(torch.allclose(kept[k], small[k], atol=1e-5) for k in small)
    # the noise: std z * C
    zeros = {"level0": torch.zeros(4, 8, 64, 64)}
    noisy = DPGaussian(DPConfig(clip=2.0, noise_multiplier=1.5, seed=3))(zeros, CTX)
    assert noisy["level0"].std().item() == pytest.approx(3.0, rel=0.05)


def test_dp_backward_scales_the_gradient_by_the_clip_factor() -> None:
    x = features()
    chain = FilterChain([DPGaussian(DPConfig(clip=5.0, noise_multiplier=0.5, seed=0))])
    tape = chain.apply(x, CTX)
    ones = {k: torch.ones_like(v) for k, v in x.items()}
    grads = tape.backward(ones)
    factor = 5.0 / per_sample_sq_norms(x).sqrt()
    for k in x:
        assert torch.allclose(grads[k][:, 0].flatten(1)[:, 0], factor)


@pytest.mark.parametrize(("mode", "levels"), [(QuantMode.INT8, 127), (QuantMode.INT4, 7)])
def test_integer_quantisation_round_trips_within_one_step(mode: QuantMode, levels: int) -> None:
    x = features()
    out = Quantize(QuantizeConfig(mode=mode))(x, CTX)
    for name, t in x.items():
        step = t.abs().max().item() / levels
        assert (out[name] - t).abs().max().item() <= step / 2 + 1e-6
        assert len(torch.unique(torch.round(out[name] / step))) <= 2 * levels + 1


def test_fp16_quantisation_is_the_fp16_rounding() -> None:
    x = features()
    out = Quantize(QuantizeConfig(mode="fp16"))(x, CTX)
    assert torch.equal(out["level0"], x["level0"].half().float())


def test_topk_keeps_exactly_k_per_sample() -> None:
    x = features()
    out = TopK(TopKConfig(keep=0.1))(x, CTX)
    for name, t in x.items():
        per_sample = t[0].numel()
        k = math.ceil(0.1 * per_sample)
        nonzero = (out[name] != 0).flatten(1).sum(dim=1)
        assert torch.all(nonzero == k), (name, nonzero, k)
        # the kept ones are the largest in magnitude
        kept_min = torch.where(out[name] != 0, t.abs(), torch.inf).flatten(1).min(dim=1).values
        dropped_max = torch.where(out[name] == 0, t.abs(), -torch.inf).flatten(1).max(dim=1).values
        assert torch.all(kept_min >= dropped_max)


def test_topk_routes_the_gradient_only_through_the_kept_entries() -> None:
    config = tiny_config(cut_level=1, skips="all")
    encoder = make_site_encoder(config, "t1", seed=0)
    reference = make_site_encoder(config, "t1", seed=0)
    step = SiteStep(encoder, filters=FilterChain([TopK(TopKConfig(keep=0.2))]))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sent = step.forward(x, step=1)
    grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in sent.items()}
    step.backward(grads, step=1)
    outputs = reference(x)
    masked = [grads[k] * (sent[k] != 0) for k in outputs]
    torch.autograd.backward([outputs[k] for k in outputs], masked)
    for (name, p), (_, q) in zip(encoder.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # and not what the unmasked gradient would give
    unmasked = make_site_encoder(config, "t1", seed=0)
    out2 = unmasked(x)
    torch.autograd.backward([out2[k] for k in out2], [grads[k] for k in out2])
    assert not torch.allclose(next(unmasked.parameters()).grad, next(encoder.parameters()).grad)


def test_the_chain_runs_hooks_in_reverse_and_passes_gradients_straight_through_otherwise() -> None:
    calls = []

    class Scale:
        name = "scale"

        def __init__(self, factor: float) -> None:
            self.factor = factor

        def __call__(self, tensors, context):
            return {k: v * self.factor for k, v in tensors.items()}

        def backward(self, gradients, inputs, context):
            calls.append(self.factor)
            return {k: g * self.factor for k, g in gradients.items()}

    def plus_one(tensors, context):
        return {k: v + 1 for k, v in tensors.items()}

    chain = FilterChain([Scale(2.0), plus_one, Scale(3.0)])
    x = {"level0": torch.ones(1, 1, 2, 2)}
    tape = chain.apply(x, CTX)
    assert torch.equal(tape.outputs["level0"], torch.full((1, 1, 2, 2), 9.0))
    grads = tape.backward({"level0": torch.ones(1, 1, 2, 2)})
    assert calls == [3.0, 2.0] and torch.equal(grads["level0"], torch.full((1, 1, 2, 2), 6.0))
