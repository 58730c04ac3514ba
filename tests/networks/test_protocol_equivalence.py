"""One split step through the protocol equals one autograd pass through the fused model (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from splitunet.config import SplitUNetConfig
from splitunet.losses import default_loss
from splitunet.networks import SplitUNet
from splitunet.protocol import AggregatorStep, SiteStep

CASES = [
    (dims, fusion, cut, skips)
    for dims in (2, 3)
    for fusion in ("concat", "sum", "mean")
    for cut, skips in ((0, "all"), (1, "all"), (1, "none"), (2, "all"), (2, (1,)), (2, "none"))
]


def _inputs(dims: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = (32, 32) if dims == 2 else (16, 16, 16)
    x = torch.randn(2, 4, *size, generator=g, dtype=torch.float64).float()
    y = (torch.rand(2, 3, *size, generator=g) > 0.7).float()
    return x, y


@pytest.mark.parametrize(("dims", "fusion", "cut", "skips"), CASES)
def test_split_step_equals_fused_autograd(dims, fusion, cut, skips):
    torch.manual_seed(0)
    features = (8, 16, 32, 64) if dims == 2 else (4, 8, 16)
    config = SplitUNetConfig(spatial_dims=dims, features=features, cut_level=cut, skips=skips, fusion=fusion)
    fused = SplitUNet(config)
    encoders = {name: copy.deepcopy(enc) for name, enc in fused.encoders.items()}
    decoder = copy.deepcopy(fused.decoder)
    x, y = _inputs(dims)
    loss_fn = default_loss()

    # reference: one autograd pass through the fused model
    ref_loss = loss_fn(fused(x), y)
    ref_loss.backward()

    # the protocol: detach at the sites, fuse and step at the aggregator, backward at the sites
    sites = {name: SiteStep(enc) for name, enc in encoders.items()}
    inputs = fused.split_inputs(x)
    sent = {name: site.forward(inputs[name], step=1) for name, site in sites.items()}
    for bundle in sent.values():
        assert all(t.is_leaf and not t.requires_grad for t in bundle.values())
    result = AggregatorStep(decoder, loss_fn).step(sent, y, step=1)
    for name, site in sites.items():
        assert set(result.gradients[name]) == set(sent[name])
        site.backward(result.gradients[name], step=1)

    assert abs(result.loss - ref_loss.item()) <= 1e-6
    split_params = dict(decoder.named_parameters(prefix="decoder"))
    for name, enc in encoders.items():
        split_params.update(enc.named_parameters(prefix=f"encoders.{name}"))
    fused_params = dict(fused.named_parameters())
    assert set(split_params) == set(fused_params)
    scale = max(p.grad.abs().max().item() for p in fused_params.values())
    for pname, p in fused_params.items():
        diff = (split_params[pname].grad - p.grad).abs().max().item()
        assert diff <= 1e-6 * max(scale, 1.0), f"{pname}: max abs diff {diff:.3g} (grad scale {scale:.3g})"


def test_dropped_skip_changes_architecture():
    kept = SplitUNet(SplitUNetConfig(spatial_dims=2, features=(8, 16, 32), cut_level=2, skips="all"))
    dropped = SplitUNet(SplitUNetConfig(spatial_dims=2, features=(8, 16, 32), cut_level=2, skips=(1,)))
    # level 0 skip dropped: the level-1 UpCat takes no skip input (fewer input channels), the site sends no level0
    assert kept.encoders["t1"].output_names == ("level0", "level1", "level2")
    assert dropped.encoders["t1"].output_names == ("level1", "level2")
    w_kept = kept.decoder.upcats["upcat_1"].convs.conv_0.conv.weight
    w_dropped = dropped.decoder.upcats["upcat_1"].convs.conv_0.conv.weight
    assert w_kept.shape[1] == 4 * 8 + 16 and w_dropped.shape[1] == 16
