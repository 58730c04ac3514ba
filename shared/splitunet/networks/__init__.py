"""Networks: the cuttable Split-U-Net and its baselines."""

from __future__ import annotations

from splitunet.networks.baselines import (
    centralized_config,
    centralized_unet,
    single_modality_config,
    single_modality_unet,
)
from splitunet.networks.factory import (
    make_optimizer,
    make_server_decoder,
    make_site_encoder,
    make_split_unet,
    part_seed,
)
from splitunet.networks.split_unet import ServerDecoder, SiteEncoder, SplitUNet, architecture_fingerprint

__all__ = [
    "ServerDecoder",
    "SiteEncoder",
    "SplitUNet",
    "architecture_fingerprint",
    "centralized_config",
    "make_optimizer",
    "make_server_decoder",
    "make_site_encoder",
    "make_split_unet",
    "part_seed",
    "centralized_unet",
    "single_modality_config",
    "single_modality_unet",
]
