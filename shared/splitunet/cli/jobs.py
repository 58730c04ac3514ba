"""``splitunet jobs``: submit, list, watch, stop and resume training jobs, and segment a case, on a deployed
aggregator through :mod:`splitunet.client` (exit codes: :mod:`splitunet.cli.connection`)."""

from __future__ import annotations

import json
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
    fail,
    load_document,
)

app = typer.Typer(help="Training jobs on a deployed aggregator: submit, list, status, watch, stop, resume, infer. "
                       "Exit codes: 0 success, 1 job failed, 2 usage, 3 unreachable or refused credential.",
                  no_args_is_help=True)

JobId = Annotated[str, typer.Argument(help="The job's id (`splitunet jobs list`).", show_default=False)]
Poll = Annotated[float, typer.Option("--poll", min=0.05, help="Seconds between status polls.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the status as JSON (the service's JobStatus).")]


def _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) -> Any:
    return connect(service="jobs", url=url, token_file=token_file, ca_file=ca_file, client_cert=client_cert,
                   client_key=client_key, profile=profile, timeout=timeout)


def _final_code(status: Any) -> ExitCode:
    """0 while the job runs or once it succeeded; 1 when it failed, stopped or is paused by the privacy gate."""
    return ExitCode.FAILED if status.state.value in ("failed", "stopped", "paused_by_privacy_gate") else ExitCode.OK


def _follow(job: Any, poll: float) -> ExitCode:
    """The rich live view of ``job`` (on stderr) until it settles; its exit code."""
    from rich.console import Console
    from rich.live import Live

    from splitunet.cli.views import job_view

    console = Console(stderr=True)
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        status = job.wait(lambda s: live.update(job_view(s)), poll_s=poll)
    if status.state.value == "paused_by_privacy_gate":
        console.print(f"job {job.job_id} is paused by the privacy gate: `splitunet jobs resume {job.job_id}` "
                      "continues it")
    elif status.state.value != "succeeded":
        console.print(f"job {job.job_id} {status.state.value}")
    return _final_code(status)


@app.command("submit")
def submit_command(
    spec: Annotated[Path, typer.Argument(help="The job spec: a JSON or YAML file (FederationSpec; `-`: JSON on "
                                              "stdin).", show_default=False)],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch the job until it ends; exit 1 unless it "
                                                                 "succeeds.")] = False,
    poll: Poll = 1.0,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Submit a training job; print its id on stdout (one job runs at a time per aggregator)."""
    document = load_document(spec)
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        job = fed.jobs.submit(document)
        typer.echo(job.job_id)
        if follow:
            raise typer.Exit(int(_follow(job, poll)))


@app.command("list")
def list_command(
    as_json: AsJson = False,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """List the aggregator's jobs, oldest first."""
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        statuses = fed.jobs.list()
    if as_json:
        typer.echo(json.dumps([s.model_dump(mode="json", exclude={"losses", "step_times"}) for s in statuses],
                              indent=2))
        return
    from rich.console import Console

    from splitunet.cli.views import jobs_table

    Console().print(jobs_table(statuses))


@app.command("status")
def status_command(
    job_id: JobId,
    as_json: AsJson = False,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Show a job's status; exit 1 when it failed, stopped or is paused by the privacy gate."""
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        status = fed.jobs.get(job_id).status()
    from splitunet.cli.views import job_view, print_status

    print_status(status, as_json, job_view)
    raise typer.Exit(int(_final_code(status)))


@app.command("watch")
def watch_command(
    job_id: JobId,
    poll: Poll = 1.0,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Live view of a job (step, loss, throughput, ETA, last validation) until it ends; exit 0 if it succeeded."""
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        raise typer.Exit(int(_follow(fed.jobs.get(job_id), poll)))


@app.command("stop")
def stop_command(
    job_id: JobId,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job has stopped.")] = False,
    poll: Poll = 1.0,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Ask a running job to stop (it can be resumed from its latest complete checkpoint)."""
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        job = fed.jobs.get(job_id)
        status = job.stop()
        if wait:
            from splitunet.client.jobs import FINAL_STATES

            status = job.wait(poll_s=poll, until=FINAL_STATES)
    typer.echo(f"{job_id} {status.state.value} at step {status.step}")


@app.command("resume")
def resume_command(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch the job until it ends.")] = False,
    poll: Poll = 1.0,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Continue a job the privacy gate paused, or restart a failed or stopped job from its latest complete
    checkpoint."""
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        job = fed.jobs.get(job_id)
        status = job.resume()
        typer.echo(f"{job_id} {status.state.value} from step {status.resumed_from_step or status.step}")
        if follow:
            raise typer.Exit(int(_follow(job, poll)))


@app.command("infer")
def infer_command(
    case_id: Annotated[str, typer.Argument(help="An aligned case id (labelled, or named in the job's "
                                                "infer_cases).", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the segmentation (.nii.gz).",
                                      show_default=False)],
    job_id: Annotated[str | None, typer.Option("--job", help="The job whose model segments (default: the latest "
                                                             "job with a model).", show_default=False)] = None,
    url: Url = None, token_file: TokenFile = None, ca_file: CaFile = None, client_cert: ClientCert = None,
    client_key: ClientKey = None, profile: ProfileName = None, timeout: Timeout = None,
) -> None:
    """Segment one case through the sites' encoders and the job's decoder; write the NIfTI (BraTS labels on the
    case's own grid)."""
    if not out.name.endswith((".nii.gz", ".nii")):
        fail(ExitCode.USAGE, f"-o {str(out)!r}: the segmentation is a gzipped NIfTI, name it *.nii.gz")
    with client_errors(), _federation(url, token_file, ca_file, client_cert, client_key, profile, timeout) as fed:
        path = fed.jobs.infer(case_id, out, job_id=job_id)
    typer.echo(f"segmentation of {case_id} written to {path}")
