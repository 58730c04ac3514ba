"""The memory model of a request: how many bytes a forward (site) or a step (aggregator) allocates, from its shape.

A Split-U-Net layer at level ``l`` holds ``features[l]`` channels at ``1 / 2**(dims*l)`` of the input's voxels, so
the activations of a part of the network scale with ``voxels x channels``, where *channels* is the part's
level-weighted channel sum (:func:`encoder_channels`, :func:`decoder_channels`). The bytes per voxel-channel are
measured (``python -m splitunet.bench.hostile`` checks the model against the services' peak RSS; docs/limits.md):

- a site's encoder, evaluation (no graph): 7.0-12.1 B on CPU for the encoder alone (2D and 3D, cut 0-3; the
  tensors of one ``TwoConv``: conv, norm, activation), bounded here by :data:`EVAL_BYTES` = 32 B (the activation
  bundle, its wire copy and the allocator's slack come on top);
- a site's encoder, training: 25.6-40.9 B for the encoder's forward and backward alone, 73-80 B end to end in a
  site process (``splitunet.bench.hostile``: the graph kept until the backward, the activation bundle sent, the
  gradient bundle received and decoded, the allocator's slack), bounded by :data:`TRAIN_BYTES` = 96 B;
- the aggregator's decoder step (fusion, the remaining encoder levels, the decoder, its backward): 13.0-21.3 B
  over :func:`decoder_channels` (2D and 3D, cut 0 and 2, 4 sites), bounded by :data:`AGG_STEP_BYTES` = 32 B;
- the weights: :data:`PARAMETER_BYTES` = 16 B per parameter (fp32 weight, gradient and Adam's two moments),
  the parameters counted exactly on PyTorch's ``meta`` device (nothing allocated).

A service checks the figure against its budget (``SITE_MAX_FORWARD_BYTES``, ``AGG_MAX_STEP_BYTES``) *before* it
allocates anything, and refuses with :class:`~splitunet.errors.ResourceLimitError` (413 ``over_memory_bound``)
naming the bytes asked for, the limit and the setting.
"""

from __future__ import annotations

from splitunet.config import Fusion, SplitUNetConfig
from splitunet.errors import ResourceLimitError

#: Bytes per voxel-channel of an encoder forward without a graph (measured 7.0-12.1 B for the encoder alone).
EVAL_BYTES = 32
#: Bytes per voxel-channel of a training forward + backward (measured 73-80 B end to end in a site process).
TRAIN_BYTES = 96
#: Bytes per voxel-channel of the aggregator's step (measured 13.0-21.3 B).
AGG_STEP_BYTES = 32
#: Bytes per parameter: fp32 weight, gradient and Adam's two moments.
PARAMETER_BYTES = 16


def _level_channels(config: SplitUNetConfig, level: int) -> float:
    return config.features[level] / 2 ** (config.spatial_dims * level)


def encoder_channels(config: SplitUNetConfig) -> float:
    """Level-weighted channels of one site's encoder (levels ``0 .. cut_level``): channels per input voxel."""
    return sum(_level_channels(config, level) for level in range(config.cut_level + 1))


def decoder_channels(config: SplitUNetConfig) -> float:
    """Level-weighted channels of the aggregator's part for the config's sites: the fused inputs of the sent
    levels, the encoder levels after the cut, every decoder level (its concatenation and its output) and the
    output logits."""
    k = config.num_sites
    fused = sum((k if config.fusion == Fusion.CONCAT else 1) * _level_channels(config, level)
                for level in config.sent_levels)
    rest = sum(_level_channels(config, level) for level in range(config.cut_level + 1, config.depth))
    decoder = sum(3 * _level_channels(config, level) for level in range(config.depth - 1))
    return fused + rest + decoder + config.out_channels


def site_forward_bytes(config: SplitUNetConfig, voxels: int, *, train: bool) -> int:
    """Bytes a site allocates for a forward of ``voxels`` input voxels (samples x spatial size); the weights
    (:func:`encoder_weight_bytes`) come on top."""
    return int(voxels * encoder_channels(config) * (TRAIN_BYTES if train else EVAL_BYTES))


def aggregator_step_bytes(config: SplitUNetConfig, voxels: int) -> int:
    """Bytes the aggregator allocates for one training step (or validation window batch) of ``voxels`` voxels,
    weights and optimizer state included."""
    return int(voxels * decoder_channels(config) * AGG_STEP_BYTES) + decoder_weight_bytes(config)


def encoder_weight_bytes(config: SplitUNetConfig, site: str) -> int:
    """Bytes of a site encoder's weights, gradients and Adam state (parameters counted on the meta device)."""
    import torch

    from splitunet.networks.split_unet import SiteEncoder

    with torch.device("meta"):
        return PARAMETER_BYTES * sum(p.numel() for p in SiteEncoder(config, site).parameters())


def decoder_weight_bytes(config: SplitUNetConfig) -> int:
    """Bytes of the aggregator's decoder weights, gradients and Adam state (counted on the meta device)."""
    import torch

    from splitunet.networks.split_unet import ServerDecoder

    with torch.device("meta"):
        return PARAMETER_BYTES * sum(p.numel() for p in ServerDecoder(config).parameters())


def check_bound(needed: int, limit: int, *, setting: str, what: str, **detail: object) -> None:
    """Refuse (413 ``over_memory_bound``) when ``needed`` bytes exceed ``limit``; the message names both."""
    if needed > limit:
        raise ResourceLimitError(
            f"{what} needs about {needed / 2**20:.0f} MiB by this service's memory model, above its limit of "
            f"{limit / 2**20:.0f} MiB ({setting}): use fewer or smaller samples, or a narrower model",
            detail={"bytes": needed, "limit": limit, "setting": setting, **detail},
        )
