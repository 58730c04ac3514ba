"""``splitunet partition``: turn a BraTS download into per-party folders (sites and aggregator)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def partition_command(
    brats: Annotated[Path, typer.Option(help="BraTS folder: one sub-folder per case (2021 or 2023 naming).")],
    out: Annotated[Path, typer.Option(help="Output folder (new or empty).")],
    sites: Annotated[
        list[str] | None,
        typer.Option(
            help="'t1,t1ce,t2,flair' (one site per modality) or 'a=t1,t1ce b=t2,flair'; may be repeated "
            "(--sites a=t1,t1ce --sites b=t2,flair)."
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="link (symbolic links) | copy")] = "link",
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Fraction of cases listed in validation.txt.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the validation draw.")] = 0,
    on_bad_case: Annotated[
        str, typer.Option("--on-bad-case", help="raise | skip (log and leave out unusable cases)")
    ] = "raise",
    check: Annotated[str, typer.Option(help="header (fast) | full (decode every file)")] = "header",
) -> None:
    """Write OUT/sites/<site>/<case>/ (that site's modalities only), OUT/aggregator/<case>/ (segmentations
    only), OUT/validation.txt and OUT/partition.json."""
    import logging

    from splitunet.config import parse_sites
    from splitunet.data.partition import partition_cohort
    from splitunet.errors import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        site_specs = parse_sites(" ".join(sites) if sites else "t1,t1ce,t2,flair")
        result = partition_cohort(
            brats,
            out,
            site_specs,
            mode=mode,
            val_fraction=val_fraction,
            seed=seed,
            on_bad_case=on_bad_case,
            check=check,
        )
    except DataError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(code=1) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(
        f"{len(result.case_ids)} cases ({len(result.validation)} held out, {len(result.skipped)} skipped) -> "
        f"{len(result.sites)} sites + aggregator in {result.out}"
    )
    for site in result.sites:
        typer.echo(f"  {result.site_dir(site.name)}  [{', '.join(site.modalities)}]")
    typer.echo(f"  {result.aggregator_dir}  [seg]")
