"""The ``splitunet`` console script: one typer app, one module per subcommand.

Each subcommand module imports its heavy dependencies (torch, MONAI) inside the command function, so that
``splitunet --help`` stays fast.
"""

from __future__ import annotations

import typer

from splitunet.cli import audit as _audit
from splitunet.cli import audits as _audits
from splitunet.cli import bench as _bench
from splitunet.cli import demo as _demo
from splitunet.cli import jobs as _jobs
from splitunet.cli import partition as _partition
from splitunet.cli import phantom as _phantom
from splitunet.cli import plan as _plan
from splitunet.cli import probe as _probe
from splitunet.cli import serve as _serve
from splitunet.cli import subsets as _subsets

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


app.command("demo")(_demo.demo_command)
app.command("plan")(_plan.plan_command)
app.command("partition")(_partition.partition_command)
app.command("phantom")(_phantom.phantom_command)
app.command("serve")(_serve.serve_command)
app.command("probe")(_probe.probe_command)
app.command("bench")(_bench.bench_command)
app.command("subsets")(_subsets.subsets_command)
app.add_typer(_audit.app, name="audit")
app.add_typer(_jobs.app, name="jobs")
app.add_typer(_audits.app, name="audits")


def main() -> None:
    """Entry point of the ``splitunet`` console script."""
    app()
