"""``splitunet bench``: wire efficiency, split overhead, bytes and scaling measured in one run (see
:mod:`splitunet.bench.suite`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def bench_command(
    dims: Annotated[int | None, typer.Option(help="Only 2D or only 3D split steps (default: both).")] = None,
    quick: Annotated[bool, typer.Option(help="A tiny smoke configuration (seconds; the figures mean little).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every figure to this JSON file.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda: where the services and the in-process steps run.")] = "cpu",
    fsha: Annotated[bool, typer.Option(help="Only the FSHA row: a hijacking aggregator against the site's own "
                                            "leakage gate, and honest runs for its false alarms.")] = False,
) -> None:
    """Measure P1 (wire efficiency), P2 (split overhead), P3 (bytes ratio), scaling with sites and ROI,
    throughput, peak RSS per service, phantom generation and white-box inversion time; print a table."""
    import logging

    from rich.console import Console
    from rich.table import Table

    from splitunet.bench.suite import BenchPlan, run_bench

    if dims not in (None, 2, 3):
        raise typer.BadParameter(f"--dims must be 2 or 3, got {dims}")
    if device != "cpu" and not device.startswith("cuda"):
        raise typer.BadParameter(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING)
    if fsha:
        _fsha_row(quick, json_path, console)
        return
    plan = BenchPlan.quick() if quick else BenchPlan.full()
    try:
        doc = run_bench(plan, dims=(dims,) if dims else (2, 3), device=device,
                        progress=lambda msg: console.log(msg))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=2))
    machine = doc["machine"]
    out = Console()
    head = Table(title=f"splitunet bench ({'quick' if doc['quick'] else 'full'}) on {machine['cpu_model']}, "
                       f"{machine['cores']} cores, device {device}")
    for col in ("figure", "measured", "target"):
        head.add_column(col)
    head.add_row("P1 wire efficiency", _ratio(doc["p1_wire_efficiency"]), doc["targets"]["p1_wire_efficiency"])
    for key, value in doc["p2_split_overhead"].items():
        target = doc["targets"]["p2_cut0" if key.startswith("cut0") else "p2_cut2"]
        head.add_row(f"P2 split overhead {key}", _ratio(value), target)
    for key, value in doc["p2_split_overhead_delayed"].items():
        if value is not None:
            head.add_row(f"P2 with the delayed schedule {key}", _ratio(value), "(optional schedule)")
    wire = doc["wire"]
    head.add_row("P1 bound by the fp16 casts alone", _ratio(wire["p1_cast_bound"]), "(the limit with casts)")
    head.add_row("P3 bytes ratio (worst)", f"{doc['p3_bytes_ratio']:.4f}", doc["targets"]["p3_bytes_ratio"])
    out.print(head)
    steps = Table(title="split steps (medians after warm-up, seconds)")
    for col in ("config", "HTTP", "in process", "ratio", "plan", "forward", "aggregator", "backward", "MiB/step",
                "samples/s"):
        steps.add_column(col, justify="left" if col == "config" else "right")
    rows = [*doc["runs"], *(r for r in doc["scaling"]["sites"] + doc["scaling"]["roi"] if r not in doc["runs"])]
    for r in rows:
        p = r["phases_s"]
        steps.add_row(r["config"], f"{r['http_step_s']:.3f}",
                      f"{r['in_process_step_s']:.3f}" if "in_process_step_s" in r else "-",
                      _ratio(r.get("overhead")), *(f"{p.get(k, 0):.3f}" for k in ("plan", "forward", "aggregator",
                                                                                   "backward")),
                      f"{r['wire_bytes_per_step'] / 2**20:.1f}", f"{r['samples_per_s']:.1f}")
    out.print(steps)
    out.print(f"P1, {wire['bundle_bytes'] / 2**20:.0f} MiB bundle, seconds: HTTP path {wire['http_s']:.3f} (encode "
              f"{wire['encode_s']:.3f} + post + decode {wire['decode_s']:.3f}); transfer only "
              f"{wire['transfer_s']:.3f}; the two casts {wire['cast_s']:.3f}; raw TCP {wire['tcp_s']:.3f}")
    rss = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in doc["peak_rss_bytes"].items() if v is not None)
    out.print(f"peak RSS (MiB): {rss}")
    ph, wb = doc["phantom"], doc["whitebox_inversion"]
    out.print(f"phantom {tuple(ph['shape'])}: {ph['seconds_per_case']:.2f} s per case; white-box inversion "
              f"{wb['size']}x{wb['size']}, {wb['iterations']} iterations: {wb['seconds']:.2f} s per slice")
    out.print(f"total {doc['total_s']:.0f} s" + (f"; JSON: {json_path}" if json_path else ""))


def _fsha_row(quick: bool, json_path: Path | None, console) -> None:
    """The FSHA bench row (:mod:`splitunet.bench.fsha`), printed and optionally written as JSON."""
    from rich.console import Console

    from splitunet.bench.fsha import FSHAPlan, run_fsha_bench

    row = run_fsha_bench(FSHAPlan.quick() if quick else FSHAPlan(), progress=lambda msg: console.log(msg))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(row, indent=2))
    out = Console()
    plan = row["plan"]
    out.print(f"FSHA vs the site's gate ({plan['attack']} attack, stop above SSIM {plan['max_ssim']}, every "
              f"{plan['every']} steps, {plan['steps']} steps): steps to detection {row['steps_to_detection']}, gate "
              f"SSIM at detection {row['gate_ssim_at_detection']}, attacker's SSIM then "
              f"{row['attacker_ssim_at_detection']} (at its last check {row['attacker_ssim_last_check']}); false "
              f"alarms {row['false_alarms']} of {row['honest_runs']} honest runs (their highest gate SSIM "
              f"{row['honest_max_gate_ssim']}); {row['seconds']:.0f} s")
    for check in row["fsha_checks"]:
        out.print(f"  FSHA step {check['step']}: gate SSIM {check['gate_ssim']:.3f}, attacker SSIM "
                  f"{check['attacker_ssim']:.3f}")
