"""The ``trainguard`` command line: a thin layer over the library.

Each command maps its options onto library objects; user mistakes (a missing run
directory, a bad option) end in a one-line ``trainguard: error: ...`` and the exit code
of the error class, never a traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from trainguard._version import __version__
from trainguard.cli.checkpoints import gc_command, ls_command, verify_command
from trainguard.cli.data_manifest import data_group
from trainguard.cli.export import export_command
from trainguard.cli.jobs import (
    logs_command,
    ps_command,
    resume_command,
    rm_command,
    run_command,
    status_command,
    stop_command,
    sync_command,
)
from trainguard.cli.preflight import preflight_command
from trainguard.errors import TrainguardError


class _Group(click.Group):
    """A click group that turns library errors into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TrainguardError as exc:
            click.echo(f"trainguard: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainguard")
@click.option("-q", "--quiet", is_flag=True, help="Only print warnings and errors.")
def cli(quiet: bool) -> None:
    """trainguard: training runs that never lose progress.

    Inspect, verify and prune the checkpoints of a run directory (a path or a
    store URL such as s3://bucket/runs/exp1), and gate runs on their data.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("trainguard")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


cli.add_command(ls_command)
cli.add_command(verify_command)
cli.add_command(gc_command)
cli.add_command(data_group)
for _command in (run_command, ps_command, status_command, logs_command, stop_command,
                 rm_command, resume_command, sync_command, preflight_command,
                 export_command):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="trainguard")
