"""The cuttable U-Net: K site encoders, one server decoder, and the fused single-process model.

Built from the stages of MONAI's ``BasicUNet`` (``TwoConv``, ``Down``, ``UpCat``), keeping its stage names:
level 0 is ``conv_0`` (full resolution), level ``i >= 1`` is ``down_i`` (``1 / 2**i`` resolution), the decoder is
``upcat_{depth-1} .. upcat_1`` and ``final_conv``.

With cut level ``L`` a site runs ``conv_0 .. down_L`` on its own modalities and returns an ordered mapping of
named tensors, ``{"level{i}": B, features[i], *spatial / 2**i}``, for the sent skip levels ``i < L`` and the cut
level ``L``. The server decoder fuses the K sites' tensors per level (concat / sum / mean), runs the encoder levels
``L+1 .. depth-1`` and the decoder, and returns ``B, out_channels, *spatial`` logits (TC, WT, ET; sigmoid).
A skip that is not sent is absent from the decoder: its ``UpCat`` is built with ``cat_chns=0`` and called with
``x_e=None``; no zeros are substituted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from splitunet.config import Fusion, SiteSpec, SplitUNetConfig, tensor_name
from splitunet.errors import ConfigurationError, WireFormatError
from splitunet.networks.fusion import absent_embeddings, fuse_level

#: Tensors from one site: tensor name -> ``B, C, *spatial``.
SiteTensors = Mapping[str, torch.Tensor]


def _encoder_stage(config: SplitUNetConfig, level: int, in_channels: int) -> nn.Module:
    """The encoder stage of ``level``: ``TwoConv`` at level 0, ``Down`` (max-pool, two convs) below."""
    common = dict(act=config.act, norm=config.norm, bias=True, dropout=config.dropout)
    if level == 0:
        return TwoConv(config.spatial_dims, in_channels, config.features[0], **common)
    return Down(config.spatial_dims, in_channels, config.features[level], **common)


class SiteEncoder(nn.Module):
    """Encoder levels ``0 .. cut_level`` of one site.

    Args:
        config: the Split-U-Net configuration.
        site: the site (or its name in ``config.sites``) whose modalities are the input channels.

    ``forward(x)`` takes ``B, C_site, *spatial`` (C_site = number of the site's modalities, in its order) and returns
    an ordered dict ``{"level{i}": B, features[i], *spatial/2**i}`` for ``i`` in ``config.sent_levels``.
    """

    def __init__(self, config: SplitUNetConfig, site: SiteSpec | str) -> None:
        super().__init__()
        if isinstance(site, str):
            try:
                site = config.site(site)
            except KeyError as exc:
                raise ConfigurationError(str(exc.args[0])) from None
        self.config = config
        self.site = site
        self.stages = nn.ModuleDict()
        in_channels = site.in_channels
        for level in range(config.cut_level + 1):
            self.stages[_stage_name(level)] = _encoder_stage(config, level, in_channels)
            in_channels = config.features[level]
        self.sent_levels = config.sent_levels

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the tensors this encoder sends, shallowest first."""
        return tuple(tensor_name(level) for level in self.sent_levels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != self.config.spatial_dims + 2 or x.shape[1] != self.site.in_channels:
            raise ValueError(
                f"site {self.site.name!r} expects input B, {self.site.in_channels}, "
                f"{', '.join(['S'] * self.config.spatial_dims)}; got shape {tuple(x.shape)}"
            )
        out: dict[str, torch.Tensor] = {}
        for level in range(self.config.cut_level + 1):
            x = self.stages[_stage_name(level)](x)
            if level in self.sent_levels:
                out[tensor_name(level)] = x
        return out

    def fingerprint(self) -> str:
        """A short hash of the architecture (site, activation, normalisation, parameter names and shapes), not of
        the weights: two encoders that compute different functions of the same shapes (e.g. another activation)
        have different fingerprints."""
        layers = {"act": list(self.config.act), "norm": list(self.config.norm)}
        return architecture_fingerprint(self, {"site": self.site.model_dump(mode="json"), **layers})


class ServerDecoder(nn.Module):
    """Fusion, the remaining encoder levels ``cut_level+1 .. depth-1`` and the decoder, at the aggregator.

    ``forward(site_tensors)`` takes ``{site name: {"level{i}": B, features[i], *spatial/2**i}}`` for every site, or
    for a non-empty subset of them (the others are absent: see :mod:`splitunet.networks.fusion`), and returns logits
    ``B, out_channels, *spatial``.
    """

    def __init__(self, config: SplitUNetConfig) -> None:
        super().__init__()
        self.config = config
        cut, depth, feats = config.cut_level, config.depth, config.features
        common = dict(act=config.act, norm=config.norm, bias=True, dropout=config.dropout)

        # channels of the tensor available at each level on the server side (0 = skip not available)
        self.level_channels: list[int] = [0] * depth
        for level in config.sent_levels:
            self.level_channels[level] = config.fused_channels(level)
        self.stages = nn.ModuleDict()
        in_channels = self.level_channels[cut]
        for level in range(cut + 1, depth):
            self.stages[_stage_name(level)] = _encoder_stage(config, level, in_channels)
            self.level_channels[level] = feats[level]
            in_channels = feats[level]

        self.upcats = nn.ModuleDict()
        current = self.level_channels[depth - 1]
        for level in range(depth - 1, 0, -1):
            self.upcats[f"upcat_{level}"] = UpCat(
                config.spatial_dims,
                in_chns=current,
                cat_chns=self.level_channels[level - 1],
                out_chns=feats[level - 1],
                upsample=config.upsample,
                halves=level != 1,
                **common,
            )
            current = feats[level - 1]
        self.final_conv = Conv["conv", config.spatial_dims](feats[0], config.out_channels, kernel_size=1)
        #: concat only, with ``config.absent_embedding``: the learned stand-ins of absent sites (registered last, so
        #: the other parameters keep their order and optimizer-state indices)
        self.absent: nn.ParameterDict | None = None
        if config.absent_embedding and config.fusion == Fusion.CONCAT:
            self.absent = absent_embeddings([s.name for s in config.sites],
                                            {level: feats[level] for level in config.sent_levels})

    def expected_names(self) -> tuple[str, ...]:
        return tuple(tensor_name(level) for level in self.config.sent_levels)

    def fuse(self, site_tensors: Mapping[str, SiteTensors]) -> dict[int, torch.Tensor]:
        """Fuse the sites' tensors per sent level: ``{level: B, fused_channels(level), *spatial/2**level}``.

        ``site_tensors`` holds every site or a non-empty subset (absent sites: :mod:`splitunet.networks.fusion`).
        Sites are combined in ``config.sites`` order, so concatenation is deterministic.
        """
        names = [s.name for s in self.config.sites]
        unknown = sorted(set(site_tensors) - set(names))
        if unknown or not site_tensors:
            raise WireFormatError(
                f"expected tensors from sites {names} (or a non-empty subset), got {sorted(site_tensors)}",
                detail={"expected": names, "got": sorted(site_tensors)},
            )
        present = [s for s in names if s in site_tensors]
        fused: dict[int, torch.Tensor] = {}
        for level in self.config.sent_levels:
            key = tensor_name(level)
            parts = {}
            for site in present:
                if key not in site_tensors[site]:
                    raise WireFormatError(
                        f"site {site!r} did not send {key!r}; expected {list(self.expected_names())}",
                        detail={"site": site, "missing": key},
                    )
                parts[site] = site_tensors[site][key]
            shapes = {tuple(p.shape) for p in parts.values()}
            if len(shapes) != 1:
                raise WireFormatError(
                    f"sites disagree on the shape of {key!r}: {sorted(shapes)}", detail={"tensor": key}
                )
            fused[level] = fuse_level(parts, names, self.config.fusion, level=level, embeddings=self.absent)
        return fused

    def forward(self, site_tensors: Mapping[str, SiteTensors]) -> torch.Tensor:
        return self.decode(self.fuse(site_tensors))

    def decode(self, fused: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Run the server levels and the decoder on fused tensors ``{level: B, C, *spatial/2**level}``."""
        cut, depth = self.config.cut_level, self.config.depth
        features: dict[int, torch.Tensor] = dict(fused)
        x = features[cut]
        for level in range(cut + 1, depth):
            x = self.stages[_stage_name(level)](x)
            features[level] = x
        for level in range(depth - 1, 0, -1):
            x = self.upcats[f"upcat_{level}"](x, features.get(level - 1))
        return self.final_conv(x)


class SplitUNet(nn.Module):
    """The fused single-process model: the K site encoders and the server decoder composed.

    ``forward(x)`` takes all modalities as channels, ``B, sum(C_site), *spatial``, in ``config.modalities`` order
    (site by site) and returns logits ``B, out_channels, *spatial``. It is the reference for the split protocol:
    one autograd pass through it equals one split step in fp32.
    """

    def __init__(self, config: SplitUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict({s.name: SiteEncoder(config, s) for s in config.sites})
        self.decoder = ServerDecoder(config)

    def split_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``B, sum(C_site), *spatial`` into ``{site: B, C_site, *spatial}``."""
        total = sum(s.in_channels for s in self.config.sites)
        if x.ndim != self.config.spatial_dims + 2 or x.shape[1] != total:
            raise ValueError(
                f"SplitUNet expects input B, {total} ({', '.join(self.config.modalities)}), spatial dims "
                f"{self.config.spatial_dims}; got shape {tuple(x.shape)}"
            )
        out, start = {}, 0
        for s in self.config.sites:
            out[s.name] = x[:, start : start + s.in_channels]
            start += s.in_channels
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_sites(self.split_inputs(x))

    def forward_sites(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Forward from per-site inputs ``{site: B, C_site, *spatial}``: every site, or a non-empty subset (the
        others are absent, as in a step that left them out; see :mod:`splitunet.networks.fusion`)."""
        return self.decoder({name: enc(inputs[name]) for name, enc in self.encoders.items() if name in inputs})


def _stage_name(level: int) -> str:
    return "conv_0" if level == 0 else f"down_{level}"


def architecture_fingerprint(module: nn.Module, extra: Mapping[str, object] | None = None) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameter names and shapes plus ``extra`` JSON data."""
    desc = {
        "params": [[n, list(p.shape)] for n, p in module.named_parameters()],
        "buffers": [[n, list(b.shape)] for n, b in module.named_buffers()],
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
