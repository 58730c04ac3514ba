"""A step with sites left out equals the fused model with those inputs absent (fp32), for every fusion."""

from __future__ import annotations

import copy

import pytest
import torch

from splitunet.config import SplitUNetConfig
from splitunet.errors import ConfigurationError, WireFormatError
from splitunet.losses import default_loss
from splitunet.networks import SplitUNet
from splitunet.networks.fusion import embedding_key
from splitunet.protocol import AggregatorStep, SiteStep

CASES = [
    (fusion, embedding, cut, present)
    for fusion, embedding in (("concat", True), ("concat", False), ("sum", False), ("mean", False))
    for cut in (0, 1)
    for present in (("t1",), ("t1ce", "flair"), ("t1", "t1ce", "t2"))
]


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 32, 32, generator=g)
    y = (torch.rand(2, 3, 32, 32, generator=g) > 0.7).float()
    return x, y


def _model(fusion: str, embedding: bool, cut: int) -> SplitUNet:
    torch.manual_seed(0)
    config = SplitUNetConfig(spatial_dims=2, features=(8, 16, 32), cut_level=cut, fusion=fusion,
                             absent_embedding=embedding)
    model = SplitUNet(config)
    if model.decoder.absent is not None:  # a trained embedding is not zero: make the test see it
        with torch.no_grad():
            for p in model.decoder.absent.values():
                p.normal_()
    return model


@pytest.mark.parametrize(("fusion", "embedding", "cut", "present"), CASES)
def test_step_with_sites_left_out_equals_fused_model_without_them(fusion, embedding, cut, present):
    fused = _model(fusion, embedding, cut)
    encoders = {name: copy.deepcopy(enc) for name, enc in fused.encoders.items()}
    decoder = copy.deepcopy(fused.decoder)
    x, y = _inputs()
    inputs = fused.split_inputs(x)
    loss_fn = default_loss()

    ref_loss = loss_fn(fused.forward_sites({k: inputs[k] for k in present}), y)
    ref_loss.backward()

    sites = {name: SiteStep(encoders[name]) for name in present}  # the others are not asked to forward
    sent = {name: site.forward(inputs[name], step=1) for name, site in sites.items()}
    result = AggregatorStep(decoder, loss_fn).step(sent, y, step=1, sites=list(present))
    assert set(result.gradients) == set(present)  # sites left out get no gradient
    for name, site in sites.items():
        site.backward(result.gradients[name], step=1)

    assert abs(result.loss - ref_loss.item()) <= 1e-6
    split = dict(decoder.named_parameters(prefix="decoder"))
    for name, enc in encoders.items():
        split.update(enc.named_parameters(prefix=f"encoders.{name}"))
    reference = dict(fused.named_parameters())
    assert set(split) == set(reference)
    scale = max(p.grad.abs().max().item() for p in reference.values() if p.grad is not None)
    for pname, p in reference.items():
        if p.grad is None:  # an absent site's encoder, or an unused embedding: untouched on both sides
            assert split[pname].grad is None, pname
            continue
        diff = (split[pname].grad - p.grad).abs().max().item()
        assert diff <= 1e-6 * max(scale, 1.0), f"{pname}: max abs diff {diff:.3g}"
    for name in set(fused.encoders) - set(present):
        assert all(p.grad is None for p in encoders[name].parameters())
    if embedding:  # the absent sites' embeddings learn; the present sites' are not used
        for name in fused.encoders:
            grad = reference[f"decoder.absent.{embedding_key(name, cut)}"].grad
            assert (grad is not None and grad.abs().sum() > 0) == (name not in present)


@pytest.mark.parametrize("fusion", ["concat", "sum", "mean"])
def test_full_set_is_the_model_without_absence_handling(fusion):
    with_embedding = _model(fusion, True, 1)
    plain = SplitUNet(SplitUNetConfig(spatial_dims=2, features=(8, 16, 32), cut_level=1, fusion=fusion))
    plain.load_state_dict(with_embedding.state_dict(), strict=False)
    x, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(with_embedding(x), plain(x))


def test_mean_and_sum_renormalise_over_the_present_sites():
    x, _ = _inputs()
    for fusion in ("sum", "mean"):
        model = _model(fusion, False, 0)
        inputs = model.split_inputs(x)
        tensors = {k: model.encoders[k](inputs[k]) for k in ("t1", "t2")}
        fused = model.decoder.fuse(tensors)[0]
        mean = (tensors["t1"]["level0"] + tensors["t2"]["level0"]) / 2
        expected = mean if fusion == "mean" else mean * 4  # sum of 2 of 4 sites, scaled by 4/2
        assert torch.allclose(fused, expected, atol=1e-6)


def test_bad_subsets_are_refused():
    model = _model("concat", True, 0)
    step = AggregatorStep(model.decoder, default_loss())
    x, y = _inputs()
    sent = {"t1": model.encoders["t1"](model.split_inputs(x)["t1"])}
    with pytest.raises(ConfigurationError, match="non-empty subset"):
        step.step({}, y, sites=[])
    with pytest.raises(ConfigurationError, match="non-empty subset"):
        step.step(sent, y, sites=["t1", "pet"])
    with pytest.raises(WireFormatError, match="expected tensors from sites"):
        step.step(sent, y, sites=["t1", "t2"])  # t2 was named but sent nothing
    with pytest.raises(WireFormatError):
        step.step(sent, y)  # without sites=, every site is expected, as before
    secure = AggregatorStep(model.decoder, default_loss(), inbound=lambda bundles: bundles)
    with pytest.raises(ConfigurationError, match="secure sum needs every site"):
        secure.step(sent, y, sites=["t1"])
