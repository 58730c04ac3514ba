"""Cut planner: for every cut level and skip policy, what a site holds and what crosses the network per step.

Figures are raw tensor payload bytes (``numel * itemsize``) for one training step of one batch, without the wire
frame (a few hundred bytes of header and metadata per bundle) and before optional compression. Forward = the
activations a site sends; backward = the gradients it receives (same shapes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

from splitunet.config import SkipPolicy, SplitUNetConfig
from splitunet.networks.split_unet import ServerDecoder, SiteEncoder
from splitunet.protocol import expected_site_shapes

#: bytes per element of the wire dtypes the planner reports.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class CutPlan:
    """The plan of one (cut level, skip policy) for a configuration, ROI and batch size."""

    cut_level: int
    skips: str
    sent_tensors: dict[str, list[int]]
    params_per_site: dict[str, int]
    params_server: int
    forward_bytes_per_site: dict[str, int]
    backward_bytes_per_site: dict[str, int]
    total_bytes_per_step: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def skip_policies(cut_level: int) -> list[SkipPolicy | tuple[int, ...]]:
    """The skip policies worth comparing at a cut level: all, none, and all but the full-resolution skip."""
    if cut_level == 0:
        return [SkipPolicy.ALL]
    policies: list[SkipPolicy | tuple[int, ...]] = [SkipPolicy.ALL, SkipPolicy.NONE]
    if cut_level >= 2:
        policies.append(tuple(range(1, cut_level)))
    return policies


def describe_skips(skips: SkipPolicy | tuple[int, ...]) -> str:
    return skips.value if isinstance(skips, SkipPolicy) else ",".join(str(s) for s in skips)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan_cut(config: SplitUNetConfig, roi: tuple[int, ...], batch_size: int) -> CutPlan:
    """Plan the configuration as given (its own cut level and skips)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shapes = expected_site_shapes(config, batch_size, roi)
    numel = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        numel += n
    per_dtype = {d: numel * b for d, b in DTYPE_BYTES.items()}
    k = config.num_sites
    return CutPlan(
        cut_level=config.cut_level,
        skips=describe_skips(config.skips),
        sent_tensors={name: list(shape) for name, shape in shapes.items()},
        params_per_site={s.name: _params(SiteEncoder(config, s)) for s in config.sites},
        params_server=_params(ServerDecoder(config)),
        forward_bytes_per_site=per_dtype,
        backward_bytes_per_site=dict(per_dtype),
        total_bytes_per_step={d: 2 * k * v for d, v in per_dtype.items()},
    )


def plan_all(config: SplitUNetConfig, roi: tuple[int, ...], batch_size: int) -> Iterator[CutPlan]:
    """Plans for every cut level ``0 .. depth-1`` and each skip policy of :func:`skip_policies`."""
    config.check_roi(roi)
    for cut in range(config.depth):
        for skips in skip_policies(cut):
            variant = SplitUNetConfig.model_validate({**config.model_dump(), "cut_level": cut, "skips": skips})
            yield plan_cut(variant, roi, batch_size)
