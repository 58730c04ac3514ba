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
from splitunet.training import EvalCase, InProcessFederation, train_in_process


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


def _cases(images: torch.Tensor, regions: torch.Tensor) -> list[EvalCase]:
    """Each synthetic 2D image as a one-slice case ``(C, X, Y, 1)``."""
    return [EvalCase(f"case-{i}", images[i][..., None], regions[i][..., None]) for i in range(images.shape[0])]


def test_in_process_training_learns_synthetic_tumours():
    torch.manual_seed(0)
    config = SplitUNetConfig(spatial_dims=2, features=(8, 16, 32, 64))
    federation = InProcessFederation(config, lr_site=3e-3, lr_server=3e-3)
    g = torch.Generator().manual_seed(1)
    val = _cases(*synthetic_batch(8, (64, 64), generator=torch.Generator().manual_seed(99)))
    before = federation.evaluate(val, (64, 64))["dice"]["WT"]
    history = train_in_process(
        federation, lambda step: synthetic_batch(8, (64, 64), generator=g), steps=40,
        validation=lambda: val, val_roi=(64, 64), val_interval=20,
    )
    after = history.validations[-1][1]
    assert len(history.losses) == 40 and history.losses[-1] < history.losses[0]
    assert after["cases"] == 8 and len(after["per_case"]) == 8
    assert after["dice"]["WT"] > 0.8 and after["dice"]["WT"] > before + 0.2, (before, after["dice"])


def test_in_process_evaluation_is_per_case_over_whole_volumes(monkeypatch):
    """Two cases of 6 slices, tumour in 2 slices of each; the model predicts the tumour of the first case in every
    slice. Per case over the volume: Dice 2*2/(6+2) = 0.5 and 1.0 (a per-slice mean would give other numbers)."""
    config = SplitUNetConfig(spatial_dims=2, features=(4, 8))
    federation = InProcessFederation(config)
    regions = torch.zeros(2, 3, 8, 8, 6)
    regions[:, :, 2:5, 2:5, 1:3] = 1.0
    images = torch.zeros(2, 4, 8, 8, 6)
    images[0, 0] = 1.0  # marks case 0 for the stub model
    tumour = regions[0, :, :, :, 1]

    def predict(batch: torch.Tensor) -> torch.Tensor:  # B, 4, 8, 8 -> B, 3, 8, 8 logits
        marked = batch[:, 0].flatten(1).amax(1) > 0
        out = torch.where(tumour.bool(), 8.0, -8.0).expand(batch.shape[0], -1, -1, -1).clone()
        keep = regions[1].permute(3, 0, 1, 2)[: batch.shape[0]]  # case 1: exactly its own tumour
        return torch.where(marked[:, None, None, None], out, torch.where(keep.bool(), 8.0, -8.0))

    monkeypatch.setattr(federation, "predict", predict)
    cases = [EvalCase("a", images[0], regions[0], (1.0, 1.0, 2.0)), EvalCase("b", images[1], regions[1])]
    result = federation.evaluate(cases, (8, 8), hd95=True, batch_size=6)
    assert result["cases"] == 2
    assert [c["dice"]["WT"] for c in result["per_case"]] == pytest.approx([0.5, 1.0])
    assert result["dice"]["WT"] == pytest.approx(0.75)
    assert result["per_case"][1]["hd95"]["WT"] == 0.0
    # case a: 4 false-positive slices, the farthest 3 slices (6 mm with 2 mm slices) from the true tumour
    assert 0.0 < result["per_case"][0]["hd95"]["WT"] <= 6.0 + 1e-6
