"""Configuration of a Split-U-Net: which sites hold which modalities, where the network is cut, what crosses.

The configuration is a pydantic model so that the same object is validated in Python, sent in a REST job spec
and written into checkpoints. Every invalid value raises a ``ValueError`` (pydantic's ``ValidationError`` is
one) whose message names the parameter and the allowed values.

Levels are numbered from 0 (full resolution, the first ``TwoConv`` block) to ``depth - 1`` (the bottleneck);
level ``i`` has ``features[i]`` channels at ``1 / 2**i`` of the input resolution.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from splitunet.layer_specs import check_layer_spec

#: BraTS modality names in the canonical order used everywhere in this project.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Output region channels, in MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` order.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")


class Fusion(StrEnum):
    """How the aggregator combines the K sites' tensors of one level.

    - ``concat``: concatenate along channels (``B, K*C, ...``); the default.
    - ``sum``: elementwise sum (``B, C, ...``); compatible with secure aggregation.
    - ``mean``: elementwise mean (``B, C, ...``).
    """

    CONCAT = "concat"
    SUM = "sum"
    MEAN = "mean"


class SkipPolicy(StrEnum):
    """Named skip policies; an explicit list of level indices is also accepted."""

    ALL = "all"
    NONE = "none"


class SiteSpec(BaseModel):
    """One data site: its name and the modalities it holds (input channels, in this order)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$")
    modalities: tuple[str, ...]

    @field_validator("modalities")
    @classmethod
    def _check_modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) == 0:
            raise ValueError(f"a site must hold at least one modality; allowed modalities: {list(MODALITIES)}")
        unknown = [m for m in value if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modality {unknown}; allowed modalities: {list(MODALITIES)}")
        if len(set(value)) != len(value):
            raise ValueError(f"modalities must not repeat within a site, got {list(value)}")
        return value

    @property
    def in_channels(self) -> int:
        return len(self.modalities)


def default_sites() -> tuple[SiteSpec, ...]:
    """Four sites, one BraTS modality each, named after the modality."""
    return tuple(SiteSpec(name=m, modalities=(m,)) for m in MODALITIES)


def parse_sites(spec: str) -> tuple[SiteSpec, ...]:
    """Parse a command-line site list.

    ``"t1,t1ce,t2,flair"`` gives one site per modality; ``"a=t1,t1ce b=t2,flair"`` gives named sites
    holding several modalities each.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("sites: empty site list; give e.g. 't1,t1ce,t2,flair' or 'a=t1,t1ce b=t2,flair'")
    if "=" not in spec:
        return tuple(SiteSpec(name=m.strip(), modalities=(m.strip(),)) for m in spec.split(","))
    sites = []
    for part in spec.split():
        if "=" not in part:
            raise ValueError(f"sites: '{part}' has no '='; write NAME=MOD[,MOD...] for every site")
        name, mods = part.split("=", 1)
        sites.append(SiteSpec(name=name, modalities=tuple(m for m in mods.split(",") if m)))
    return tuple(sites)


class SplitUNetConfig(BaseModel):
    """Architecture of a Split-U-Net.

    Args:
        spatial_dims: 2 (axial slices, ``B, C, H, W``) or 3 (volumes, ``B, C, H, W, D``).
        features: channels per encoder level, shallowest first (default 16-32-64-128-256, 5 levels).
        sites: the data sites and their modalities (default: t1, t1ce, t2, flair, one site each).
        cut_level: the deepest encoder level run at the sites, in ``0 .. depth-1``.
        skips: skip levels ``< cut_level`` whose features the sites send: ``"all"``, ``"none"`` or a list of
            level indices. A skip that is not sent is removed from the decoder (its ``UpCat`` has no skip input).
        fusion: how the aggregator combines the sites' tensors (see :class:`Fusion`).
        out_channels: output logits (default 3: TC, WT, ET, each with a sigmoid).
        act, norm: MONAI layer specs, as in ``BasicUNet``, from the closed set of :mod:`splitunet.layer_specs`.
        dropout: dropout probability in every block.
        upsample: ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"`` (MONAI ``UpSample`` modes).
        absent_embedding: concat fusion only: the decoder learns, per site and sent level, a ``C``-vector that
            stands in (broadcast over space) for a site that is absent from a step or a prediction; without it an
            absent site's slot is zeros (see :mod:`splitunet.networks.fusion`). The trainer turns it on for a job
            trained for absence (site dropout or ``missing_site_policy: continue``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    spatial_dims: int = 3
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    sites: tuple[SiteSpec, ...] = Field(default_factory=default_sites)
    cut_level: int = 0
    skips: SkipPolicy | tuple[int, ...] = SkipPolicy.ALL
    fusion: Fusion = Fusion.CONCAT
    out_channels: int = 3
    act: tuple[str, dict[str, Any]] = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
    norm: tuple[str, dict[str, Any]] = ("instance", {"affine": True})
    dropout: float = 0.0
    upsample: str = "deconv"
    absent_embedding: bool = False

    @field_validator("spatial_dims")
    @classmethod
    def _check_dims(cls, value: int) -> int:
        if value not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {value}")
        return value

    @field_validator("features")
    @classmethod
    def _check_features(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) < 2:
            raise ValueError(f"features needs at least 2 levels (one down-sampling), got {list(value)}")
        if any(f < 1 for f in value):
            raise ValueError(f"features must all be positive channel counts, got {list(value)}")
        return value

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, value: tuple[SiteSpec, ...]) -> tuple[SiteSpec, ...]:
        if len(value) == 0:
            raise ValueError("sites must name at least one site (zero sites given); e.g. t1,t1ce,t2,flair")
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return value

    @field_validator("skips", mode="before")
    @classmethod
    def _parse_skips(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in {p.value for p in SkipPolicy}:
            parts = [p for p in value.replace(" ", "").split(",") if p]
            try:
                return tuple(int(p) for p in parts)
            except ValueError:
                raise ValueError(
                    f"skips must be 'all', 'none' or a list of level indices, got {value!r}"
                ) from None
        if isinstance(value, list):
            return tuple(value)
        return value

    @field_validator("fusion", mode="before")
    @classmethod
    def _check_fusion(cls, value: Any) -> Any:
        allowed = [f.value for f in Fusion]
        if isinstance(value, str) and value not in allowed:
            raise ValueError(f"fusion must be one of {allowed}, got {value!r}")
        return value

    @field_validator("act", "norm", mode="before")
    @classmethod
    def _check_layers(cls, value: Any, info: Any) -> Any:
        return check_layer_spec(info.field_name, value)

    @field_validator("out_channels")
    @classmethod
    def _check_out(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"out_channels must be >= 1, got {value}")
        return value

    @field_validator("dropout")
    @classmethod
    def _check_dropout(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _check_cut(self) -> SplitUNetConfig:
        depth = len(self.features)
        if not 0 <= self.cut_level < depth:
            raise ValueError(
                f"cut_level must be in 0..{depth - 1} (depth = len(features) = {depth}), got {self.cut_level}"
            )
        if isinstance(self.skips, tuple):
            allowed = list(range(self.cut_level))
            bad = [lvl for lvl in self.skips if lvl not in allowed]
            if bad:
                raise ValueError(
                    f"skips names level(s) {bad} that are not skip levels at cut_level={self.cut_level}; "
                    f"allowed skip levels are {allowed} (or 'all' / 'none')"
                )
            if len(set(self.skips)) != len(self.skips):
                raise ValueError(f"skips must not repeat a level, got {list(self.skips)}")
        if self.norm[0].lower() == "group":
            groups = self.norm[1]["num_groups"]
            bad = [f for f in self.features if f % groups]
            if bad:
                raise ValueError(f"norm group: num_groups {groups} must divide every level's channels; "
                                 f"{bad} of features {list(self.features)} are not multiples of it")
        return self

    # ------------------------------------------------------------------ derived quantities
    @property
    def depth(self) -> int:
        """Number of encoder levels."""
        return len(self.features)

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def sent_skip_levels(self) -> tuple[int, ...]:
        """Skip levels (``< cut_level``) whose features the sites send, ascending."""
        if self.skips == SkipPolicy.ALL:
            return tuple(range(self.cut_level))
        if self.skips == SkipPolicy.NONE:
            return ()
        return tuple(sorted(self.skips))

    @property
    def sent_levels(self) -> tuple[int, ...]:
        """All levels a site sends: the sent skips and the cut level, ascending."""
        return (*self.sent_skip_levels, self.cut_level)

    @property
    def modalities(self) -> tuple[str, ...]:
        """All modalities across sites, in site order (the fused model's input channels)."""
        return tuple(m for s in self.sites for m in s.modalities)

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites are {[s.name for s in self.sites]}")

    def fused_channels(self, level: int) -> int:
        """Channels of the fused tensor of a sent ``level`` at the aggregator."""
        width = self.features[level]
        return width * self.num_sites if self.fusion == Fusion.CONCAT else width

    def min_roi_multiple(self) -> int:
        """Every spatial size of the input must be a multiple of this (``2 ** (depth - 1)``)."""
        return 2 ** (self.depth - 1)

    def check_roi(self, roi: tuple[int, ...]) -> tuple[int, ...]:
        """Validate a region of interest (spatial size of one input) against the model."""
        roi = tuple(int(r) for r in roi)
        if len(roi) != self.spatial_dims:
            raise ValueError(f"roi must have {self.spatial_dims} sizes for spatial_dims={self.spatial_dims}, got {roi}")
        m = self.min_roi_multiple()
        if any(r < 2 * m or r % m for r in roi):
            raise ValueError(
                f"roi sizes must be multiples of {m} and at least {2 * m} "
                f"(depth {self.depth} halves the size {self.depth - 1} times), got {roi}"
            )
        return roi


def tensor_name(level: int) -> str:
    """Name of the tensor of encoder ``level`` in a site's outgoing bundle (``"level0"``, ``"level1"``...)."""
    return f"level{level}"
