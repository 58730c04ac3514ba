"""``splitunet plan``: parameters and bytes per step for every cut level and skip policy."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def plan_command(
    dims: Annotated[int, typer.Option(help="Spatial dims: 2 (slices) or 3 (volumes).")] = 3,
    roi: Annotated[str, typer.Option(help="Input size per sample, e.g. 128,128,128 (3D) or 224,224 (2D).")] = "",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per step.")] = 1,
    features: Annotated[str, typer.Option(help="Channels per level, shallowest first.")] = "16,32,64,128,256",
    sites: Annotated[
        str, typer.Option(help="'t1,t1ce,t2,flair' (one site each) or 'a=t1,t1ce b=t2,flair'.")
    ] = "t1,t1ce,t2,flair",
    fusion: Annotated[str, typer.Option(help="concat | sum | mean")] = "concat",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print, for every cut level and skip policy: parameters per site, bytes per site per step forward and
    backward at fp32/fp16, and the total per step for all K sites."""
    from rich.console import Console
    from rich.table import Table

    from splitunet.config import SplitUNetConfig, parse_sites
    from splitunet.planner import plan_all

    roi_t = _ints(roi, "roi") if roi else ((128, 128, 128) if dims == 3 else (224, 224))
    try:
        config = SplitUNetConfig(
            spatial_dims=dims, features=_ints(features, "features"), sites=parse_sites(sites), fusion=fusion
        )
        plans = list(plan_all(config, roi_t, batch_size))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if as_json:
        doc = {
            "config": config.model_dump(mode="json", include={"spatial_dims", "features", "sites", "fusion"}),
            "roi": list(roi_t),
            "batch_size": batch_size,
            "units": "bytes of raw tensor payload per training step (wire framing excluded)",
            "plans": [p.to_dict() for p in plans],
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    table = Table(
        title=f"Split-U-Net cut plan: {config.num_sites} sites, roi {roi_t}, batch {batch_size}, {fusion} fusion",
        caption="MiB of raw tensor payload per training step, fp16 / fp32; bwd = gradients (same shapes)",
    )
    for col in ("cut", "skips", "levels sent", "params/site", "params server", "fwd/site", "bwd/site", "total K sites"):
        table.add_column(col, justify="left" if col in ("skips", "levels sent") else "right")
    for p in plans:
        per_site = sorted(set(p.params_per_site.values()))
        table.add_row(
            str(p.cut_level),
            p.skips,
            ",".join(name.removeprefix("level") for name in p.sent_tensors),
            "/".join(_count(v) for v in per_site),
            _count(p.params_server),
            _pair(p.forward_bytes_per_site),
            _pair(p.backward_bytes_per_site),
            _pair(p.total_bytes_per_step),
        )
    Console().print(table)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _pair(by_dtype: dict[str, int]) -> str:
    return f"{_mb(by_dtype['fp16'])}/{_mb(by_dtype['fp32'])}"
