"""``splitunet audit verify RUN_DIR``, ``splitunet audit reconcile SITE_RUN AGG_RUN`` (two parties' records, frame by
frame), ``splitunet audit run RUN_DIR`` (a lab, no server) and ``splitunet audit once`` (one federated audit
configured like the audit service: its Kubernetes Job form)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Verify a transcript, replay attacks on it (lab mode), or run one federated audit.",
                  no_args_is_help=True)


def _key(key_file: Path | None) -> bytes | None:
    if key_file is None:
        return None
    from splitunet.service.settings import read_secret_file

    return read_secret_file(key_file)[0].encode()


@app.command("verify")
def verify_command(
    run_dir: Annotated[Path, typer.Argument(help="A run's transcript folder (<AGG_TRANSCRIPT__DIR>/<run_id>).")],
    key_file: Annotated[Path | None, typer.Option(help="The transcript's HMAC key file, if it has one.")] = None,
    public_key: Annotated[str | None, typer.Option(
        help="The recording party's Ed25519 public key (64 hex characters or a file): its heads must be signed "
             "by it.")] = None,
) -> None:
    """Recompute the hash chain, reread every frame, check the written (and signed) heads; name the first bad
    record."""
    from splitunet.errors import SplitUNetError
    from splitunet.signing import public_key as parse_key
    from splitunet.transcript import verify_transcript

    try:
        report = verify_transcript(run_dir, key=_key(key_file),
                                   public_key=None if public_key is None else parse_key(public_key))
    except SplitUNetError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    if report.ok:
        extra = f" ({report.reason})" if report.reason else ""
        signed = f", {report.signed_heads} signed heads" if report.signed_heads else ""
        typer.echo(f"OK: {report.records} records, chain intact{signed}{extra}")
        return
    typer.echo(f"TAMPERED: first bad record {report.first_bad}: {report.reason}", err=True)
    raise typer.Exit(1)


@app.command("reconcile")
def reconcile_command(
    site_run: Annotated[Path, typer.Argument(help="The site's own transcript of the run "
                                                  "(<SITE_STATE_DIR>/transcripts/<run_id>).")],
    aggregator_run: Annotated[Path, typer.Argument(help="The aggregator's transcript of the run.")],
    site_public_key: Annotated[str | None, typer.Option(help="The site's Ed25519 public key (hex or file).")] = None,
    aggregator_public_key: Annotated[str | None, typer.Option(
        help="The aggregator's Ed25519 public key (hex or file).")] = None,
    site_key_file: Annotated[Path | None, typer.Option(help="The site transcript's HMAC key file.")] = None,
    aggregator_key_file: Annotated[Path | None, typer.Option(help="The aggregator transcript's HMAC key file.")] = None,
) -> None:
    """Compare the two parties' records frame by frame (step, direction, digest); name the first disagreement.
    Exit 0 when they agree, 1 when they disagree, 2 when they cannot be read."""
    from splitunet.errors import SplitUNetError
    from splitunet.reconcile import reconcile
    from splitunet.signing import public_key as parse_key

    try:
        report = reconcile(
            site_run, aggregator_run,
            site_public_key=None if site_public_key is None else parse_key(site_public_key),
            aggregator_public_key=None if aggregator_public_key is None else parse_key(aggregator_public_key),
            site_hmac=_key(site_key_file), aggregator_hmac=_key(aggregator_key_file))
    except SplitUNetError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    if report.ok:
        typer.echo(f"OK: {report.reason}")
        return
    typer.echo(f"DISAGREE: {report.reason}", err=True)
    raise typer.Exit(1)


@app.command("run")
def run_command(
    run_dir: Annotated[Path, typer.Argument(help="A run's transcript folder.")],
    lab_images: Annotated[Path, typer.Option(help="Lab mode: the cohort's images (BraTS layout).")],
    lab_labels: Annotated[Path | None, typer.Option(help="Lab mode: the segmentations (default: lab-images).")] = None,
    snapshots: Annotated[list[str] | None, typer.Option(
        help="site=SITE_STATE_DIR: where a site keeps its encoder snapshots (white-box); repeatable.")] = None,
    steps: Annotated[str | None, typer.Option(help="Comma-separated steps (default: the last recorded).")] = None,
    sites: Annotated[str | None, typer.Option(help="Comma-separated sites (default: all).")] = None,
    attacks: Annotated[str | None, typer.Option(
        help="Comma-separated: whitebox,unsplit,learned,label_leakage (default: all).")] = None,
    max_samples: Annotated[int, typer.Option(help="Samples attacked per site and step (image attacks).")] = 8,
    max_ssim: Annotated[float | None, typer.Option(help="Privacy gate: fail above this brain SSIM.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the HTML report here.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="The transcript's HMAC key file.")] = None,
) -> None:
    """Replay the attacks on a recorded run, reading the cohort directly (phantom or test data)."""
    from splitunet.auditing.cohorts import LabCohort
    from splitunet.auditing.report import render_html
    from splitunet.auditing.runner import AuditRunner, AuditSpec
    from splitunet.auditing.sources import LabScorer, SnapshotDirSource
    from splitunet.errors import SplitUNetError

    def split(value: str | None) -> list[str] | None:
        return None if value is None else [v for v in value.split(",") if v]

    try:
        dirs = dict(s.split("=", 1) for s in snapshots or [])
    except ValueError:
        typer.echo("error: --snapshots takes site=DIR", err=True)
        raise typer.Exit(2) from None
    try:
        spec = AuditSpec(transcript=run_dir, sites=split(sites), max_samples=max_samples,
                         steps=[int(s) for s in split(steps)] if steps else None,
                         **({"attacks": split(attacks)} if attacks else {}),
                         gate={"max_ssim": max_ssim})
        lab = LabCohort(lab_images, lab_labels)
        runner = AuditRunner(LabScorer(lab), weights=SnapshotDirSource(dirs) if dirs else None, lab=lab,
                             key=_key(key_file))
        result, artifacts = runner.run(spec)
    except (SplitUNetError, ValueError) as exc:
        typer.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    if out is not None:
        out.write_text(render_html(result, artifacts))
        typer.echo(f"report written to {out}", err=True)
    if not result.gate.passed:
        raise typer.Exit(1)


@app.command("once")
def once_command() -> None:
    """Run one federated audit with the audit service's configuration and exit: the Job form of the audit.

    Configuration comes from the environment like `splitunet serve audit` (``AUDIT_*``) plus the request:
    ``AUDIT_RUN_ID`` (default: the newest transcript), ``AUDIT_RUN_SITES`` (comma-separated registry names;
    default: the run's registered sites), ``AUDIT_RUN_SPEC`` (JSON) and ``AUDIT_REPORTS_DIR``. Prints the result
    as JSON and writes ``<AUDIT_REPORTS_DIR>/<run_id>/<audit_id>/{result.json,report.html}``. Exit status: 0 when
    the audit succeeded and its privacy gate passed, 1 when the gate failed, 2 when the audit could not run.
    """
    from pydantic import ValidationError

    from services.audit.runtime import AuditRequest, AuditState, audit_runtime
    from services.audit.settings import AuditJobSettings
    from splitunet.cli.serve import settings_problems
    from splitunet.errors import SplitUNetError

    try:
        settings = AuditJobSettings()
    except ValidationError as exc:
        typer.echo(f"bad audit configuration:\n{settings_problems(exc)}", err=True)
        raise typer.Exit(2) from None
    with audit_runtime(settings) as manager:
        try:
            run_id = settings.run_id or manager.newest_run()
            sites = settings.run_sites or manager.run_sites(run_id)
            request = AuditRequest(run_id=run_id, sites=sites, spec=settings.run_spec)
            typer.echo(f"auditing run {run_id}, sites {', '.join(sites) or '(none)'}", err=True)
            status = manager.run_now(request)
        except (SplitUNetError, ValueError) as exc:
            typer.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps(status.model_dump(mode="json"), indent=2))
        if status.state != AuditState.SUCCEEDED:
            typer.echo(f"error: audit {status.audit_id} failed: {(status.error or {}).get('message')}", err=True)
            raise typer.Exit(2)
        out = settings.reports_dir / run_id / status.audit_id
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(status.result.model_dump(mode="json"), indent=2))
        (out / "report.html").write_text(manager.report(status.audit_id))
        typer.echo(f"report written to {out / 'report.html'}", err=True)
    if not status.result.gate.passed:
        raise typer.Exit(1)
