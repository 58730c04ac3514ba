"""Deterministic construction of the split parts, so that parties built in different processes agree.

Each part is initialised from its own seed, derived from the job seed and the part's name, so a site encoder
built in a site service has exactly the weights of the same encoder built in process (the fused reference).

Initialisation draws from torch's process-wide default generator (``fork_rng`` + ``manual_seed``), so
construction is serialised by one lock: parts built concurrently in one process (several site apps in a test
or a demo, a site setting up two runs) would otherwise interleave their draws and get other weights.
"""

from __future__ import annotations

import threading
import zlib

import torch

from splitunet.config import SiteSpec, SplitUNetConfig
from splitunet.networks.split_unet import ServerDecoder, SiteEncoder, SplitUNet


def part_seed(seed: int, part: str) -> int:
    """The initialisation seed of one part (``"site:<name>"`` or ``"server"``) for job ``seed``."""
    return zlib.crc32(f"{seed}:{part}".encode())


#: Serialises seeded construction (see the module docstring); a lock, not state.
_SEEDED_INIT = threading.Lock()


def make_site_encoder(config: SplitUNetConfig, site: SiteSpec | str, seed: int = 0) -> SiteEncoder:
    name = site if isinstance(site, str) else site.name
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, f"site:{name}"))
        return SiteEncoder(config, site)


def make_server_decoder(config: SplitUNetConfig, seed: int = 0) -> ServerDecoder:
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, "server"))
        return ServerDecoder(config)


def make_split_unet(config: SplitUNetConfig, seed: int = 0) -> SplitUNet:
    """The fused model whose parts equal :func:`make_site_encoder` / :func:`make_server_decoder` for ``seed``."""
    with _SEEDED_INIT:  # throw-away parts, but their draws must not interleave with a seeded construction
        model = SplitUNet(config)
    for s in config.sites:
        model.encoders[s.name] = make_site_encoder(config, s, seed)
    model.decoder = make_server_decoder(config, seed)
    return model


def make_optimizer(params, *, lr: float = 1e-4, weight_decay: float = 1e-5) -> torch.optim.Optimizer:
    """Adam, the BraTS recipe's optimizer (lr 1e-4, weight decay 1e-5 by default)."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
