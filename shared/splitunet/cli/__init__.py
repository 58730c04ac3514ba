"""The ``splitunet`` console script: one typer app, one module per subcommand.

Each subcommand module imports its heavy dependencies (torch, MONAI) inside the command function, so that
``splitunet --help`` stays fast.
"""

from __future__ import annotations

import typer

from splitunet.cli import plan as _plan

app = typer.Typer(
    name="splitunet",
    help="Split-U-Net federation: split learning on vertically partitioned brain MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)



@app.callback()
def _root() -> None:
    """Split-U-Net federation: split learning on vertically partitioned brain MRI."""


app.command("plan")(_plan.plan_command)


def main() -> None:
    """Entry point of the ``splitunet`` console script."""
    app()
