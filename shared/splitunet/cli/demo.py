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
    study: Annotated[str | None, typer.Option(
        help="Privacy-utility sweep: none (default in 3D), quick (default with --quick) or full (default).")] = None,
    baselines: Annotated[bool | None, typer.Option(
        help="Train the centralized and single-modality baselines (default: in 2D).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda (cuda:N) or auto, for every service and the baselines.")
                      ] = "cpu",
    study_only: Annotated[str | None, typer.Option(
        help="Only these configurations of the study level, comma-separated (e.g. none,secure-sum,dp-z0.5).")] = None,
    seeds: Annotated[int, typer.Option(
        help="Runs of the headline comparison (Split-U-Net vs centralized), seeds seed..seed+N-1, each with its "
             "own held-out cases; the report gives mean ± sd.")] = 1,
) -> None:
    """Start 4 site services (t1, t1ce, t2, flair), the aggregator and the audit service on 127.0.0.1, align the
    patients privately, train the Split-U-Net through the REST API, train the centralized and single-modality
    baselines with the same budget, run the privacy-utility study (each configuration trained over REST and its
    traffic audited), and write WORKDIR/report.json, WORKDIR/report.html and WORKDIR/figures/. Every process
    started is stopped at the end, also on error or Ctrl-C."""
    import logging

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from splitunet.demo import DemoOptions, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    workdir = workdir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        import json

        dims = dims if dims is not None else (3 if preset else 2)
        options = DemoOptions(workdir=workdir, quick=quick, data=data, dims=dims, cases=cases, steps=steps, seed=seed,
                              preset=preset, site_defenses=site_defenses, secure_sum=secure_sum, study=study,
                              baselines=baselines, device=device, seeds=seeds,
                              study_only=tuple(n.strip() for n in study_only.split(",")) if study_only else None,
                              gradient_defenses=json.loads(gradient_defenses) if gradient_defenses else [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind and stop every process
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
    )
    tasks: dict[str, int] = {}

    def on_phase(name: str) -> None:
        labels = {"data": "preparing data", "start": "starting services", "train": "training the Split-U-Net",
                  "infer": "inference", "audit": "waiting for the audits",
                  "baselines": "training baselines",
                  "report": "writing the report"}
        console.log(f"[bold cyan]phase[/bold cyan] {labels.get(name, name)}")

    def on_case(case_id: str) -> None:
        if "phantom" not in tasks:
            tasks["phantom"] = progress.add_task("phantom", total=None, info="")
        progress.update(tasks["phantom"], advance=1, info=case_id)

    def on_task(task: str, completed: float, total: float | None, info: str) -> None:
        if task not in tasks:
            tasks[task] = progress.add_task(task, total=total, info="")
        progress.update(tasks[task], completed=completed, total=total, info=info)

    console.print(f"[bold]Split-U-Net demo[/bold] in {workdir} ({'quick' if quick else 'default'}, {dims}D, "
                  f"{'BraTS ' + str(data) if data else 'phantom'})")
    try:
        with progress:
            result = run_demo(options, on_task=on_task, on_phase=on_phase, on_case=on_case)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every service process was stopped[/yellow]")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - show the reason, not a traceback, to the user
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from None

    report = result.report
    table = Table(title="Dice on held-out cases (HD95 in mm)")
    for col in ("model", "parameters", "TC", "WT", "ET", "mean", "HD95 WT", "post-processed HD95 WT"):
        table.add_column(col, justify="right")
    dice, hd95, params = report["dice"], report["hd95_mm"], report.get("parameters") or {}
    post = report.get("postprocessed") or {}
    models = [("centralized", "centralized", dice["centralized"], hd95["centralized"]),
              ("centralized (matched)", "centralized_matched", dice.get("centralized_matched"),
               hd95.get("centralized_matched")), ("Split-U-Net", "split", dice["split"], hd95["split"])]
    models += [(f"only {m}", m, d, hd95["single_modality"].get(m)) for m, d in dice["single_modality"].items()]
    for name, key, d, h in models:
        if d:
            n = params.get(key) if key in params else (params.get("single_modality") or {}).get(key)
            pp = (((post.get(key) or {}).get("postprocessed") or {}).get("hd95") or {}).get("WT")
            table.add_row(name, "-" if n is None else f"{n:,}", *(f"{d[k]:.3f}" for k in ("TC", "WT", "ET", "mean")),
                          "-" if not h or h.get("WT") is None else f"{h['WT']:.1f}",
                          "-" if pp is None else f"{pp:.1f}")
    console.print(table)
    if report["study"]:
        study_table = Table(title="Privacy-utility study (strongest image attack over sites; ΔSSIM with its 95 % CI)")
        for col in ("configuration", "Dice WT", "strongest attack", "SSIM", "prior", "ΔSSIM [95 % CI]", "label Dice",
                    "label AUC", "MiB/step"):
            study_table.add_column(col, justify="right")
        for row in report["study"]:
            b = row.get("best_attack") or {}
            wt = (row.get("dice") or {}).get("WT")
            study_table.add_row(
                row["name"] + (" *" if row["name"] == report["best"]["name"] else ""),
                "-" if wt is None else f"{wt:.3f}", f"{b.get('attack', '-')} {b.get('site', '')}",
                "-" if b.get("ssim") is None else f"{b['ssim']:.3f}",
                "-" if b.get("prior_ssim") is None else f"{b['prior_ssim']:.3f}",
                "-" if b.get("delta_ssim") is None else f"{b['delta_ssim']:+.3f}" + (
                    "" if b.get("delta_ssim_low") is None
                    else f" [{b['delta_ssim_low']:+.3f}, {b['delta_ssim_high']:+.3f}]"),
                "-" if not row["label_leakage"] else f"{row['label_leakage'].get('dice') or 0:.3f}",
                "-" if not row["label_leakage"] else f"{row['label_leakage'].get('auc') or 0:.3f}",
                "-" if row["bytes_per_step"] is None else f"{row['bytes_per_step'] / 2**20:.2f}")
        console.print(study_table)
    console.print(f"best: {report['best']['name']} — {report['best']['why']}")
    for check in report["checks"]:
        mark = {True: "[green]holds[/green]", False: "[red]does not hold[/red]", None: "not measured"}[check["holds"]]
        console.print(f"  {check['claim']}: {mark} ({check['measured']})")
    timing = report["timing"]
    console.print(
        f"steps {report['job']['steps']}, {report['throughput']['steps_per_second']:.2f} steps/s; "
        f"total {timing['total_s']:.0f} s (start-up {timing['startup_s']:.0f} s); "
        f"traffic {sum(report['traffic_bytes'].values()) / 2**20:.0f} MiB"
    )
    console.print(f"report: {result.report_path}\nhtml: {result.html_path}\nsegmentation: {report['inference']}")
