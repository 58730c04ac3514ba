"""Rich renderings of a job's and an audit's status for ``splitunet jobs`` / ``splitunet audits``."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

_STATE_STYLE = {"succeeded": "green", "failed": "red", "stopped": "yellow", "paused_by_privacy_gate": "magenta",
                "waiting_for_site": "yellow", "running": "cyan"}


def eta_seconds(status: Any) -> float | None:
    """Seconds left at the job's current speed (``None`` before the speed is known or once it ended)."""
    rate = status.steps_per_second
    if not rate or status.state.value in ("succeeded", "failed", "stopped"):
        return None
    return max(0.0, (status.steps - status.step) / rate)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def validation_line(status: Any) -> str:
    """``step 500: Dice TC 0.91 WT 0.88 ET 0.85 (mean 0.88), HD95 WT 4.1 mm`` or ``-``."""
    val = status.validation
    if not val or not isinstance(val.get("dice"), dict):
        return "-"
    dice = val["dice"]
    regions = " ".join(f"{r} {dice[r]:.3f}" for r in ("TC", "WT", "ET") if isinstance(dice.get(r), int | float))
    mean = f" (mean {dice['mean']:.3f})" if isinstance(dice.get("mean"), int | float) else ""
    hd95 = val.get("hd95") or {}
    hd = f", HD95 WT {hd95['WT']:.1f} mm" if isinstance(hd95.get("WT"), int | float) else ""
    at = f"step {status.validation_step}: " if status.validation_step is not None else ""
    return f"{at}Dice {regions}{mean}{hd}"


def job_view(status: Any) -> Group:
    """The live view of one job: state, step (with a bar), loss, throughput, ETA, last validation."""
    state = status.state.value
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", Text(f"{status.job_id}  ", style="bold") + Text(state, style=_STATE_STYLE.get(state, "")))
    table.add_row("step", f"{status.step} / {status.steps}")
    table.add_row("loss", "-" if status.loss is None else f"{status.loss:.4f}")
    speed = "-" if status.steps_per_second is None else f"{status.steps_per_second:.2f} steps/s"
    if status.samples_per_second is not None:
        speed += f", {status.samples_per_second:.1f} samples/s"
    table.add_row("throughput", speed)
    table.add_row("ETA", duration(eta_seconds(status)))
    table.add_row("validation", validation_line(status))
    table.add_row("traffic", f"{(status.bytes_sent + status.bytes_received) / 2**20:.1f} MiB")
    if status.waiting_for:
        table.add_row("waiting for", ", ".join(status.waiting_for))
    if status.privacy_gate and not status.privacy_gate.get("passed", True):
        gate = status.privacy_gate
        table.add_row("privacy gate", Text(f"site {gate.get('site')}: {gate.get('attack')} {gate.get('figure')} "
                                           f"{gate.get('value')} > {gate.get('threshold')} at step {gate.get('step')}",
                                           style="magenta"))
    if status.error:
        table.add_row("error", Text(f"{status.error.get('code')}: {status.error.get('message')}", style="red"))
    bar = ProgressBar(total=max(1, status.steps), completed=status.step, width=50)
    return Group(table, bar)


def jobs_table(statuses: list[Any]) -> Table:
    table = Table("job", "state", "step", "loss", "samples/s", "validation")
    for s in statuses:
        table.add_row(s.job_id, Text(s.state.value, style=_STATE_STYLE.get(s.state.value, "")),
                      f"{s.step}/{s.steps}", "-" if s.loss is None else f"{s.loss:.4f}",
                      "-" if s.samples_per_second is None else f"{s.samples_per_second:.1f}", validation_line(s))
    return table


def audit_view(status: Any) -> Table:
    """An audit's state, progress and, once done, its gate decision and findings."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    state = status.state.value
    table.add_row("audit", Text(f"{status.audit_id}  ", style="bold") + Text(state, style=_STATE_STYLE.get(state, "")))
    table.add_row("run", status.run_id)
    table.add_row("progress", f"{status.progress * 100:.0f} %  {status.message}")
    if status.error:
        table.add_row("error", Text(f"{status.error.get('code')}: {status.error.get('message')}", style="red"))
    if status.result is not None:
        gate = status.result.gate
        table.add_row("privacy gate", Text(gate.message(), style="green" if gate.passed else "red"))
        findings = Table("site", "step", "attack", "SSIM", "RDLV", "label Dice")
        for f in status.result.findings:
            findings.add_row(f.site, str(f.step), f.attack.value, _num(f.ssim), _num(f.rdlv), _num(f.dice))
        table.add_row("findings", findings)
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_status(status: Any, as_json: bool, view: Any) -> None:
    """Print a job's or an audit's status: the service's JSON (``--json``) or ``view(status)`` rendered by rich."""
    if as_json:
        import json

        print(json.dumps(status.model_dump(mode="json"), indent=2))
        return
    from rich.console import Console

    Console().print(view(status))
