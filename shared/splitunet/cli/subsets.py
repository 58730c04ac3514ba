"""``splitunet subsets``: the missing-site table (Dice of every site subset, with and without site dropout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def subsets_command(
    workdir: Annotated[Path, typer.Option(help="Where subsets.json and subsets.html go.")] = Path("runs/subsets"),
    cases: Annotated[int, typer.Option(help="Phantom cases (training and validation).")] = 12,
    val_cases: Annotated[int, typer.Option(help="Held-out cases.")] = 3,
    steps: Annotated[int, typer.Option(help="Training steps of each model.")] = 300,
    dropout: Annotated[float, typer.Option(help="Per-site probability of being left out of a step.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Phantom, initialisation, sampling and dropout seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
) -> None:
    """Train a split model with site dropout and one without on the phantom, and tabulate the Dice (TC, WT, ET) of
    each of the 15 subsets of the four sites (see docs/results/missing-sites.md)."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from splitunet.subsets import REGIONS, SubsetsOptions, run_subsets

    console = Console()
    try:
        options = SubsetsOptions(workdir=workdir, cases=cases, val_cases=val_cases, steps=steps, dropout=dropout,
                                 seed=seed, device=device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    with Progress(console=console) as progress:
        task = progress.add_task("training both models", total=steps)

        def on_step(step: int, total: int, plain: float, dropped: float) -> None:
            progress.update(task, completed=step,
                            description=f"training (loss {plain:.3f} without dropout, {dropped:.3f} with)")

        result = run_subsets(options, on_step=on_step)
    table = Table(title="Dice per site subset (held-out phantom cases)")
    table.add_column("sites", no_wrap=True)
    for model in ("dropout", "no dropout"):
        for region in REGIONS:
            table.add_column(f"{model} {region}", justify="right")
    for row in result.rows:
        table.add_row(",".join(row["sites"]), *(f"{row[m][r]:.3f}" for m in ("dropout", "no_dropout")
                                                 for r in REGIONS))
    console.print(table)
    worst, gap = result.checks["worst_single_missing"], result.checks["full_set_wt_gap_to_no_dropout"]
    console.print(f"worst single-site-missing WT drop (dropout): {worst['wt_drop']:+.3f} without {worst['missing']} "
                  f"(target <= {worst['tolerance']}: {'met' if worst['met'] else 'missed'})")
    console.print(f"full-set WT, no dropout minus dropout: {gap['gap']:+.3f} (target <= {gap['tolerance']}: "
                  f"{'met' if gap['met'] else 'missed'})")
    console.print(f"report: {workdir / 'subsets.html'}, {workdir / 'subsets.json'}")
