"""``trainguard data build | scan | check``: dataset manifests and the gate."""

from __future__ import annotations

import click

from trainguard.data_manifest import DataManifest, build, check_requirements, no_data, validate
from trainguard.errors import DataGateFailed


def _print_totals(manifest: DataManifest) -> None:
    for name, value in sorted(manifest.totals.items()):
        click.echo(f"  {name:>14} {value:g}")


def _progress(done: int, total: int) -> None:
    if done == total or done % 1000 == 0:
        click.echo(f"\r  scanned {done}/{total} files", nl=done == total, err=True)


@click.group("data")
def data_group() -> None:
    """Build and check the manifest of a dataset directory (files, sizes, statistics)."""


@data_group.command("build")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--pattern", default="**/*", show_default=True, help="Glob of the dataset files.")
@click.option("--stats", default=None,
              help="Per-file statistics function, 'package.module:function' -> dict of numbers.")
@click.option("--hash", "hashed", is_flag=True, help="Also checksum every file.")
def build_command(directory: str, pattern: str, stats: str | None, hashed: bool) -> None:
    """Scan DIRECTORY and write its manifest (.trainguard-data.json)."""
    try:
        manifest = build(directory, pattern=pattern, stats=stats, hashed=hashed,
                              progress=_progress)
    except (FileNotFoundError, ValueError) as exc:
        raise DataGateFailed(str(exc)) from exc
    click.echo(f"manifest of {directory}: {len(manifest.files)} files")
    _print_totals(manifest)


@data_group.command("scan")
@click.argument("directory", type=click.Path(file_okay=False))
def scan_command(directory: str) -> None:
    """Recompute DIRECTORY's manifest with the options it was built with; show changes."""
    old = DataManifest.load(directory)
    if old is None:
        raise DataGateFailed(f"{directory} has no data manifest; run "
                             f"`trainguard data build {directory}` first")
    problems = validate(old, directory)
    new = build(directory, pattern=old.pattern, stats=old.stats_fn, hashed=old.hashed,
                     progress=_progress)
    click.echo(f"{len(problems)} change(s) since the last build" + (":" if problems else ""))
    for problem in problems:
        click.echo(f"  {problem}")
    _print_totals(new)


@data_group.command("check")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--require", "requirements", multiple=True, metavar="'NAME OP NUMBER'",
              help="A condition on the totals, e.g. --require 'positive > 0'. Repeatable.")
def check_command(directory: str, requirements: tuple[str, ...]) -> None:
    """Exit 0 when DIRECTORY's manifest is fresh and meets every --require; else 4.

    Does not rebuild: a stale manifest fails, naming what changed.
    """
    manifest = DataManifest.load(directory)
    if manifest is None:
        raise DataGateFailed(f"{directory} has no data manifest; run "
                             f"`trainguard data build {directory}` first")
    problems = validate(manifest, directory)
    if no_data(problems):
        raise DataGateFailed(problems[-1])
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        shown = "; ".join(problems[:5]) + more
        raise DataGateFailed(f"data manifest of {directory} is stale: {shown}. "
                             f"Rebuild it with `trainguard data build {directory}`")
    try:
        failed = check_requirements(manifest.totals, requirements)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _print_totals(manifest)
    if failed:
        raise DataGateFailed("requirement failed: " + "; ".join(failed))
    click.echo(f"ok: {directory} is fresh" + (f" and meets {len(requirements)} requirement(s)"
                                               if requirements else ""))
