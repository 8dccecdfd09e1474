"""``trainguard ls | verify | gc``: look at and prune a run directory's checkpoints."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import click

from trainguard._units import human_bytes
from trainguard.checkpoint import retention
from trainguard.errors import RunDirError

if TYPE_CHECKING:
    from trainguard.checkpoint import CheckpointInfo, CheckpointManager


def open_run(run_dir: str) -> tuple[CheckpointManager, list[CheckpointInfo]]:
    """A manager over ``run_dir`` and its checkpoints; refuses unusable run directories.

    Raises:
        RunDirError: missing, not a directory, or holding no checkpoints.
    """
    # Here, not at the top: torch loads only for the commands that read checkpoints.
    from trainguard.checkpoint import CheckpointManager
    from trainguard.checkpoint.format import CHECKPOINTS_DIR

    if "://" not in run_dir:
        if not os.path.exists(run_dir):
            raise RunDirError(f"run directory {run_dir} does not exist; check the path")
        if not os.path.isdir(run_dir):
            raise RunDirError(f"{run_dir} is a file, not a run directory; pass the directory "
                              f"that holds {CHECKPOINTS_DIR}/")
    manager = CheckpointManager(run_dir)
    infos = manager.list()
    if not infos:
        raise RunDirError(f"{run_dir} holds no checkpoints (expected "
                          f"{run_dir.rstrip('/')}/{CHECKPOINTS_DIR}/step-*/); is it the run "
                          f"directory your training script writes to?")
    return manager, infos


def _tiers(run_dir: str, mirror: str) -> dict:
    from trainguard.checkpoint import CheckpointManager

    manager = CheckpointManager(run_dir, mirror=mirror)
    try:
        return manager.tiers()
    finally:
        manager.close()  # a reader: nothing pending, so this only stops the upload thread


def _status(info: CheckpointInfo) -> str:
    if info.valid:
        return "valid"
    # "incomplete: ..." is what the manager says of a directory without a manifest; a
    # problem that merely mentions the word (a crafted field) is still corruption.
    return "incomplete" if info.manifest is None and (info.problem or "").startswith(
        "incomplete:") else "corrupt"


def _row(info: CheckpointInfo) -> dict:
    return {"step": info.step, "created_at": info.created_at or None, "bytes": info.total_bytes,
            "reason": info.reason if info.manifest else None, "metrics": info.metrics,
            "status": _status(info), "problem": info.problem, "key": info.key}


def _format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "-"


@click.command("ls")
@click.argument("run_dir")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@click.option("--mirror", default=None, metavar="URL",
              help="The run's remote tier (e.g. s3://bucket/runs/x): also show its newest step.")
def ls_command(run_dir: str, as_json: bool, mirror: str | None) -> None:
    """List the checkpoints of RUN_DIR: step, time, size, metrics, valid or not.

    The check here is cheap (manifest present and file sizes match); use
    `trainguard verify` to check every byte.
    """
    _manager, infos = open_run(run_dir)
    tiers = _tiers(run_dir, mirror) if mirror else None
    if as_json:
        rows = [_row(i) for i in infos]
        click.echo(json.dumps({"checkpoints": rows, "tiers": tiers} if tiers else rows, indent=1))
        return
    if tiers:
        click.echo(f"newest valid step: local {tiers['primary']}, mirror {tiers['mirror']}")
    click.echo(f"{'STEP':>10}  {'CREATED':19}  {'SIZE':>10}  {'REASON':9}  {'STATUS':10}  METRICS")
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_at)) \
            if info.manifest else "-"
        size = human_bytes(info.total_bytes) if info.manifest else "-"
        reason = info.reason if info.manifest else "-"
        click.echo(f"{info.step:>10}  {created:19}  {size:>10}  {reason:9}  "
                   f"{_status(info):10}  {_format_metrics(info.metrics)}")
        if info.problem and info.manifest is not None:
            click.echo(f"{'':>10}  ! {info.problem}")


@click.command("verify")
@click.argument("run_dir")
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="Verify only this step (default: every committed checkpoint).")
def verify_command(run_dir: str, step: int | None) -> None:
    """Check every byte of RUN_DIR's checkpoints against their manifests.

    Exits 0 when every committed checkpoint verifies, 1 otherwise, naming each bad file.
    Interrupted saves (directories without a manifest) were never committed: they are
    reported but do not fail the check.
    """
    manager, infos = open_run(run_dir)
    if step is not None:
        infos = [manager.verify(step)]
    bad = 0
    for info in infos:
        if info.manifest is None and _status(info) == "incomplete":
            click.echo(f"step {info.step}: incomplete, never committed (ignored by readers)")
            continue
        result = manager.verify(info.step) if step is None else info
        if result.valid:
            click.echo(f"step {result.step}: ok ({human_bytes(result.total_bytes)}, "
                       f"{len(result.manifest.files)} files)")
        else:
            bad += 1
            click.echo(f"step {result.step}: CORRUPT: {result.problem}")
    if bad:
        raise click.exceptions.Exit(1)


@click.command("gc")
@click.argument("run_dir")
@click.option("--keep-last", type=click.IntRange(min=1), default=None, help="Keep the N newest.")
@click.option("--keep-best", type=click.IntRange(min=1), default=None,
              help="Keep the K best by --metric.")
@click.option("--metric", default=None, help="Metric for --keep-best (e.g. val_loss).")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True,
              help="Whether lower or higher --metric is better.")
@click.option("--keep-every", type=click.IntRange(min=1), default=None,
              help="Keep every checkpoint whose step is a multiple of S.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
def gc_command(run_dir: str, keep_last: int | None, keep_best: int | None, metric: str | None,
               mode: str, keep_every: int | None, dry_run: bool) -> None:
    """Delete the checkpoints of RUN_DIR that no --keep-* option keeps.

    The newest valid checkpoint is always kept. Interrupted saves are removed too.
    Refused while a training process writes RUN_DIR (it applies its own policy).
    """
    policies = []
    if keep_last is not None:
        policies.append(retention.keep_last(keep_last))
    if keep_best is not None:
        if not metric:
            raise click.UsageError("--keep-best needs --metric NAME (e.g. --metric val_loss)")
        policies.append(retention.keep_best(keep_best, metric, mode))
    if keep_every is not None:
        policies.append(retention.keep_every(keep_every))
    if not policies:
        raise click.UsageError("say what to keep: --keep-last N, --keep-best K --metric M, "
                               "or --keep-every S")
    manager, _infos = open_run(run_dir)
    try:
        doomed = manager.gc(retention.keep_any(*policies), dry_run=dry_run)
    finally:
        manager.close()
    verb = "would delete" if dry_run else "deleted"
    freed = sum(i.total_bytes for i in doomed)
    click.echo(f"{verb} {len(doomed)} checkpoint(s), {human_bytes(freed)}: "
               f"{[i.step for i in doomed]}")

