"""``splitunet audits``: start an audit of a recorded run on the deployed audit service, follow it, fetch its
findings and its HTML report, through :mod:`splitunet.client` (exit codes: :mod:`splitunet.cli.connection`).

Not to be confused with ``splitunet audit`` (singular): that one verifies a transcript or runs an audit itself,
without a service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from splitunet.cli.connection import (
    CaFile,
    ClientCert,
    ClientKey,
    ExitCode,
    ProfileName,
    Timeout,
    TokenFile,
    Url,
    client_errors,
    connect,
    load_document,
)

app = typer.Typer(help="Audits on a deployed audit service: start, status, report. Exit codes: 0 success, 1 audit "
                       "failed or its privacy gate failed, 2 usage, 3 unreachable or refused credential.",
                  no_args_is_help=True)

AuditId = Annotated[str, typer.Argument(help="The audit's id (printed by `splitunet audits start`).",
                                        show_default=False)]
Poll = Annotated[float, typer.Option("--poll", min=0.05, help="Seconds between status polls.")]


def _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) -> Any:
    return connect(service="audits", url=url, token_file=token_file, ca_file=ca_file, client_cert=client_cert,
                   client_key=client_key, profile=profile, timeout=timeout)


def _code(status: Any) -> ExitCode:
    """1 when the audit failed or its privacy gate failed; else 0 (also while it runs)."""
    if status.state.value == "failed":
        return ExitCode.FAILED
    if status.result is not None and not status.result.gate.passed:
        return ExitCode.FAILED
    return ExitCode.OK


@app.command("start")
def start_command(
    run_id: Annotated[str, typer.Argument(help="The recorded run to audit (a job's id).", show_default=False)],
    site: Annotated[list[str] | None, typer.Option("--site", help="A site of the audit's registry to ask for "
                                                                  "its own audit's figures; repeatable.")] = None,
    mode: Annotated[str, typer.Option(help="federated (sites audit themselves) or lab (the service holds all).")]
    = "federated",
    spec: Annotated[Path | None, typer.Option(help="AuditSpec fields (JSON or YAML file): steps, attacks, "
                                                   "max_samples, budgets, gate.", show_default=False)] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Wait for the audit; print its findings.")] = False,
    poll: Poll = 1.0,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Start an audit of a recorded run; print its id on stdout."""
    fields = load_document(spec) if spec is not None else {}
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        audit = fed.audits.start(run_id, sites=site or [], mode=mode, spec=fields)
        typer.echo(audit.audit_id)
        if follow:
            from rich.console import Console
            from rich.live import Live

            from splitunet.cli.views import audit_view

            console = Console(stderr=True)
            with Live(console=console, refresh_per_second=4) as live:
                status = audit.wait(lambda s: live.update(audit_view(s)), poll_s=poll)
            raise typer.Exit(int(_code(status)))


@app.command("status")
def status_command(
    audit_id: AuditId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON (the service's AuditStatus).")]
    = False,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Show an audit's state, progress, gate decision and findings; exit 1 when it failed or its gate failed."""
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        status = fed.audits.get(audit_id).status()
    from splitunet.cli.views import audit_view, print_status

    print_status(status, as_json, audit_view)
    raise typer.Exit(int(_code(status)))


@app.command("report")
def report_command(
    audit_id: AuditId,
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the HTML report.", show_default=False)],
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Write a finished audit's self-contained HTML report (findings, curves, lab-mode reconstructions)."""
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        path = fed.audits.get(audit_id).report(out)
    typer.echo(f"report of {audit_id} written to {path}")
