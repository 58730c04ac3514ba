"""What ``splitunet jobs`` and ``splitunet audits`` share: the connection options, the exit codes, and how a
failure becomes one line on stderr and an exit code a script can rely on.

Exit codes:

- ``0``: success (for ``--follow``, ``watch`` and ``status``: the job or audit succeeded, or is still running);
- ``1``: the job or audit failed, was stopped, or was paused by the privacy gate; an audit whose privacy gate
  failed; or the service failed the request (5xx);
- ``2``: usage: bad arguments, an unreadable or invalid spec file, missing connection settings, or a request the
  service refused as invalid (unknown job or audit, bad spec, a job already running, nothing to resume: 4xx);
- ``3``: the service is unreachable (connection refused, DNS, TLS handshake, timeout) or refused the credential
  (401, or 403 for a token of another scope).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any

import typer


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3


_HELP = "Connection (else SPLITUNET_* variables, else the profile)"
Url = Annotated[str | None, typer.Option("--url", help="The service's base URL (SPLITUNET_URL; for `audits`: "
                                          "SPLITUNET_AUDIT_URL).", rich_help_panel=_HELP, show_default=False)]
TokenFile = Annotated[Path | None, typer.Option("--token-file", help="File holding the operator token.",
                                                rich_help_panel=_HELP, show_default=False)]
CaFile = Annotated[Path | None, typer.Option("--ca-file", help="CA bundle that signed the services' certificates.",
                                             rich_help_panel=_HELP, show_default=False)]
ClientCert = Annotated[Path | None, typer.Option("--client-cert", help="Client certificate (mutual TLS).",
                                                 rich_help_panel=_HELP, show_default=False)]
ClientKey = Annotated[Path | None, typer.Option("--client-key", help="The client certificate's key.",
                                                rich_help_panel=_HELP, show_default=False)]
ProfileName = Annotated[str | None, typer.Option(
    "--profile", help="Profile of ~/.config/splitunet/profiles.toml (SPLITUNET_PROFILE; file: SPLITUNET_PROFILES).",
    rich_help_panel=_HELP, show_default=False)]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Read timeout of one call, seconds (default 60).",
                                               rich_help_panel=_HELP, show_default=False)]


def connect(
    *, service: str, url: str | None, token_file: Path | None, ca_file: Path | None, client_cert: Path | None,
    client_key: Path | None, profile: str | None, timeout: float | None,
) -> Any:
    """A :class:`~splitunet.client.Federation` for ``service`` (``jobs``: the aggregator, ``audits``: the audit
    service) from the options, the environment and the profile."""
    from splitunet.client import Federation

    audit = service == "audits"
    overrides = {
        "audit_url" if audit else "url": url,
        "audit_token_file" if audit else "token_file": token_file,
        "ca_file": ca_file, "client_cert": client_cert, "client_key": client_key, "timeout_s": timeout,
    }
    from splitunet.client.profiles import resolve_profile

    settings = resolve_profile(overrides, profile=profile)
    target = settings.audit_url if audit else settings.url
    if target is None:
        where = "SPLITUNET_AUDIT_URL or a profile's audit_url" if audit else "SPLITUNET_URL or a profile's url"
        fail(ExitCode.USAGE, f"no {'audit service' if audit else 'aggregator'} URL: give --url, {where}")
    values = settings.model_dump()
    if audit:
        values["url"] = None
    else:
        values["audit_url"] = None
    return Federation(**values)


def fail(code: ExitCode, message: str, detail: Any = None) -> None:
    """Print ``error: message`` (and ``detail`` as JSON) on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    if detail not in (None, {}, []):
        typer.echo(f"detail: {json.dumps(detail, default=str)}", err=True)
    raise typer.Exit(int(code))


def exit_code_of(exc: Exception) -> ExitCode:
    """The exit code of a client exception (see the module docstring)."""
    from splitunet.client.errors import ServiceUnreachableError
    from splitunet.errors import AuthError, SplitUNetError

    if isinstance(exc, ServiceUnreachableError | AuthError):
        return ExitCode.UNREACHABLE
    if isinstance(exc, SplitUNetError) and 400 <= exc.status_code < 500:
        return ExitCode.USAGE
    if isinstance(exc, ValueError):
        return ExitCode.USAGE
    return ExitCode.FAILED


@contextmanager
def client_errors() -> Iterator[None]:
    """Turn the client's typed exceptions into a message and an exit code."""
    from pydantic import ValidationError

    from splitunet.errors import SplitUNetError

    try:
        yield
    except SplitUNetError as exc:
        http = getattr(exc, "http_status", None)  # set on errors a service answered (splitunet.client.errors)
        fail(exit_code_of(exc), exc.message + (f" (HTTP {http} {exc.code})" if http else ""), exc.detail)
    except ValidationError as exc:  # an argument the service's own schema refuses (e.g. an empty case id)
        fail(ExitCode.USAGE, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except TimeoutError as exc:
        fail(ExitCode.FAILED, str(exc))


def load_document(path: Path) -> dict[str, Any]:
    """A JSON or YAML file (by its suffix; ``-`` reads JSON from stdin) as a mapping; exit 2 naming the problem."""
    import sys

    import yaml

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(ExitCode.USAGE, f"cannot read {str(path)!r}: {exc}")
    try:
        document = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        fail(ExitCode.USAGE, f"{str(path)!r} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
             f"{exc}")
    if not isinstance(document, dict):
        fail(ExitCode.USAGE, f"{str(path)!r} must hold a mapping (a JSON object), got {type(document).__name__}")
    return document
