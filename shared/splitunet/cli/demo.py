"""``splitunet demo``: the main job on the bundled phantom (or a real BraTS folder), through real services."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer


def demo_command(
    workdir: Annotated[Path | None, typer.Option(help="Output folder (default ./runs/<timestamp>).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The short run (a few minutes on 2 cores).")] = False,
    data: Annotated[Path | None, typer.Option(help="Real BraTS folder instead of the phantom.")] = None,
    dims: Annotated[int | None, typer.Option(help="2 (slices) or 3 (patches); default 2, 3 with a preset.")] = None,
    cases: Annotated[int | None, typer.Option(help="Phantom cases to generate (default 12 quick, 24 full).")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (default by mode).")] = None,
    seed: Annotated[int, typer.Option(help="Data, initialisation and sampling seed.")] = 0,
    preset: Annotated[str | None, typer.Option(help="'brats': the real-BraTS 3D job (needs --data).")] = None,
    site_defenses: Annotated[str | None, typer.Option(
        help='Every site\'s SITE_DEFENSES: a JSON list or a YAML file, e.g. \'[{"name": "dp", "clip": 20, '
             '"noise_multiplier": 1}]\'.')] = None,
    gradient_defenses: Annotated[str | None, typer.Option(
        help='The aggregator\'s gradient defenses (JSON list), e.g. \'[{"name": "smooth", "sigma": 1}]\'.')] = None,
    secure_sum: Annotated[bool, typer.Option("--secure-sum", help="Secure-sum fusion (fusion=sum, fp32).")] = False,
) -> None:
    """Start 4 site services (t1, t1ce, t2, flair) and the aggregator on 127.0.0.1, align the patients privately,
    train the Split-U-Net through the REST API, validate, segment a held-out case and write WORKDIR/report.json.
    Every process started is stopped at the end, also on error or Ctrl-C."""
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from splitunet.demo import DemoOptions, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    workdir = workdir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        import json

        dims = dims if dims is not None else (3 if preset else 2)
        options = DemoOptions(workdir=workdir, quick=quick, data=data, dims=dims, cases=cases, steps=steps, seed=seed,
                              preset=preset, site_defenses=site_defenses, secure_sum=secure_sum,
                              gradient_defenses=json.loads(gradient_defenses) if gradient_defenses else [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind and stop every process
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console,
    )
    tasks: dict[str, int] = {}

    def on_phase(name: str) -> None:
        labels = {"data": "preparing data", "start": "starting services", "train": "training", "infer": "inference"}
        console.log(labels.get(name, name))

    def on_case(case_id: str) -> None:
        if "phantom" not in tasks:
            tasks["phantom"] = progress.add_task("phantom", total=None, info="")
        progress.update(tasks["phantom"], advance=1, info=case_id)

    def on_status(status: dict) -> None:
        if "train" not in tasks:
            tasks["train"] = progress.add_task("training", total=status["steps"], info="")
        dice = (status.get("validation") or {}).get("dice") or {}
        info = f"{status['state']}  loss {status['loss']:.3f}" if status.get("loss") is not None else status["state"]
        if dice:
            info += "  val Dice " + " ".join(f"{k} {v:.2f}" for k, v in dice.items() if v is not None)
        progress.update(tasks["train"], completed=status["step"], info=info)

    console.print(f"[bold]Split-U-Net demo[/bold] in {workdir} ({'quick' if quick else 'default'}, {dims}D, "
                  f"{'BraTS ' + str(data) if data else 'phantom'})")
    try:
        with progress:
            result = run_demo(options, on_status=on_status, on_phase=on_phase, on_case=on_case)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every service process was stopped[/yellow]")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - show the reason, not a traceback, to the user
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from None

    report = result.report
    table = Table(title="Validation on held-out cases (split model, through the sites)")
    for col in ("", "TC", "WT", "ET", "mean"):
        table.add_column(col, justify="right")
    for name, label in (("dice", "Dice mean"), ("dice_median", "Dice median"), ("hd95", "HD95 mean (mm)"),
                        ("hd95_median", "HD95 median (mm)")):
        values = report[name]["split"] or {}
        cells = ("-" if values.get(k) is None else f"{values[k]:.3f}" for k in ("TC", "WT", "ET", "mean"))
        table.add_row(label, *cells)
    for case in report["per_case"]:
        table.add_row(f"{case['case_id']} Dice", *(f"{case['dice'][k]:.3f}" for k in ("TC", "WT", "ET")), "")
    console.print(table)
    timing = report["timing"]
    console.print(
        f"steps {report['job']['steps']}, {report['throughput']['steps_per_second']:.2f} steps/s; "
        f"total {timing['total_s']:.0f} s (start-up {timing['startup_s']:.0f} s); "
        f"traffic {sum(report['traffic_bytes'].values()) / 2**20:.0f} MiB"
    )
    console.print(f"report: {result.report_path}\nsegmentation: {report['inference']}")
