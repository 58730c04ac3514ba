"""``splitunet phantom``: write a BraTS-layout phantom cohort built on the MNI152 anatomy shipped with nilearn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise typer.BadParameter(f"--shape must be three integers X,Y,Z (e.g. 240,240,155), got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def phantom_command(
    out: Annotated[Path, typer.Option(help="Output folder; one sub-folder per case is written into it.")],
    cases: Annotated[int, typer.Option(min=1, help="Number of cases.")],
    seed: Annotated[int, typer.Option(min=0, help="Cohort seed: (seed, case index) fixes every case.")] = 0,
    layout: Annotated[
        str, typer.Option(help="brats2021 (t1, t1ce, t2, flair; ET = 4) | brats2023 (t1n, t1c, t2w, t2f; ET = 3)")
    ] = "brats2021",
    shape: Annotated[
        str, typer.Option(help="Voxels X,Y,Z over BraTS's 240x240x155 mm field of view (1 mm at the default).")
    ] = "240,240,155",
    start_index: Annotated[int, typer.Option("--start-index", min=0, help="Index of the first case.")] = 0,
    orientation: Annotated[str, typer.Option(help="LPS (like BraTS files) | RAS")] = "LPS",
    compress: Annotated[bool, typer.Option("--compress/--no-compress", help=".nii.gz or .nii files.")] = True,
) -> None:
    """Write OUT/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (2021 naming) or
    OUT/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz (2023 naming): a deformed MNI152 brain with a glioma
    (necrosis, enhancing rim, edema), bias field and Rician noise. Nothing is downloaded."""
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from splitunet.data.layout import BratsLayout, parse_option
    from splitunet.data.mni import MniAnatomy
    from splitunet.data.phantom import Orientation, check_shape, output_spacing, write_cohort

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        dims = check_shape(_parse_shape(shape))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shape") from None
    try:
        parse_option(BratsLayout, layout, "layout")
        parse_option(Orientation, orientation, "orientation")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[case]}"),
        console=console,
    )
    with progress:
        task = progress.add_task("phantom", total=cases, case="loading the MNI152 template")
        try:
            ids = write_cohort(
                out,
                cases,
                seed=seed,
                layout=layout,
                shape=dims,
                start_index=start_index,
                orientation=orientation,
                compress=compress,
                anatomy=MniAnatomy.load(output_spacing(dims)),
                on_case=lambda case_id: progress.update(task, advance=1, case=case_id),
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    typer.echo(f"{len(ids)} phantom cases ({layout}, {dims[0]}x{dims[1]}x{dims[2]}, {orientation}) -> {out}")
