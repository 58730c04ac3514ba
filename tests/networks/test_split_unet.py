"""Shapes, baselines and in-process training of the Split-U-Net."""

from __future__ import annotations

import pytest
import torch

from splitunet.config import SplitUNetConfig
from splitunet.data.synthetic import synthetic_batch
from splitunet.networks import (
    SplitUNet,
    centralized_unet,
    make_server_decoder,
    make_site_encoder,
    make_split_unet,
    single_modality_unet,
)
from splitunet.training import InProcessFederation, train_in_process


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cut", [0, 1, 2])
def test_output_shape(dims, cut):
    config = SplitUNetConfig(spatial_dims=dims, features=(4, 8, 16), cut_level=cut)
    size = (32, 32) if dims == 2 else (16, 16, 16)
    assert SplitUNet(config)(torch.randn(1, 4, *size)).shape == (1, 3, *size)


def test_wrong_input_channels_is_explained():
    model = SplitUNet(SplitUNetConfig(spatial_dims=2, features=(4, 8)))
    with pytest.raises(ValueError, match="expects input B, 4"):
        model(torch.randn(1, 3, 16, 16))


def test_baselines_share_widths():
    config = SplitUNetConfig(spatial_dims=2, features=(4, 8, 16))
    central = centralized_unet(config)
    single = single_modality_unet(config, "flair")
    assert central(torch.randn(2, 4, 32, 32)).shape == (2, 3, 32, 32)
    assert single(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    # same decoder widths: the first decoder conv after the skip has the same output width
    assert central.decoder.final_conv.weight.shape == SplitUNet(config).decoder.final_conv.weight.shape
    with pytest.raises(ValueError, match="modality must be one of"):
        single_modality_unet(config, "pet")


def test_parts_are_deterministic_per_seed():
    config = SplitUNetConfig(spatial_dims=2, features=(4, 8))
    a, b = make_site_encoder(config, "t2", seed=3), make_site_encoder(config, "t2", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = make_site_encoder(config, "t2", seed=4)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    fused = make_split_unet(config, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(fused.encoders["t2"].parameters(), a.parameters()))
    dec = make_server_decoder(config, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(fused.decoder.parameters(), dec.parameters()))


def test_in_process_training_learns_synthetic_tumours():
    torch.manual_seed(0)
    config = SplitUNetConfig(spatial_dims=2, features=(8, 16, 32, 64))
    federation = InProcessFederation(config, lr_site=3e-3, lr_server=3e-3)
    g = torch.Generator().manual_seed(1)
    val = [synthetic_batch(8, (64, 64), generator=torch.Generator().manual_seed(99))]
    before = federation.evaluate(val)["dice"]["WT"]
    history = train_in_process(
        federation, lambda step: synthetic_batch(8, (64, 64), generator=g), steps=40,
        validation=lambda: val, val_interval=20,
    )
    after = history.validations[-1][1]["dice"]
    assert len(history.losses) == 40 and history.losses[-1] < history.losses[0]
    assert after["WT"] > 0.8 and after["WT"] > before + 0.2, (before, after)
