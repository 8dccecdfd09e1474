"""``trainguard run --backend modal`` and the Modal branches of ps/status/logs/stop.

Kept apart from ``cli/jobs.py`` so the local commands never import ``modal``. The
Modal client is reached only through :func:`client` (tests replace it with a fake).
"""

from __future__ import annotations

import contextlib
import json

import click

from trainguard.errors import TrainguardError
from trainguard.launch import JobSpec, JobTable
from trainguard.preflight import run_preflight

#: The seam factory; tests monkeypatch it with a fake client.
_CLIENT_FACTORY = None


def client():
    """The :class:`~trainguard.launch.modal_jobs.ModalClient` to use."""
    if _CLIENT_FACTORY is not None:
        return _CLIENT_FACTORY()
    from trainguard.launch.modal_jobs import RealModalClient

    return RealModalClient()


def modal_options(*, volume, gpu, cpu, memory, packages, requirements_file, root,
                  nnodes="1", rdma=False, rdzv_endpoint=None, add_local=(), secrets=()):
    """Build ``ModalOptions`` from CLI values; option errors become click errors."""
    from trainguard.launch.modal_backend import ModalConfigError, ModalOptions

    if not volume:
        raise click.UsageError("--backend modal needs --volume NAME (the modal.Volume that "
                               "holds the run's checkpoints)")
    if rdzv_endpoint:
        raise click.UsageError("--rdzv-endpoint is for the local backend: the nodes of a "
                               "Modal cluster find rank 0 themselves; drop it")
    if not str(nnodes).isdigit():
        raise click.UsageError(f"--nnodes {nnodes}: a Modal cluster has a fixed size; use a "
                               f"whole number, e.g. --nnodes 2")
    try:
        return ModalOptions(volume=volume, gpu=gpu, cpu=cpu, memory=memory,
                            packages=tuple(packages), requirements_file=requirements_file,
                            root=root, nnodes=int(nnodes), rdma=rdma,
                            add_local=tuple(add_local), secrets=tuple(secrets))
    except ModalConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def modal_torchrun(options, nproc_per_node: int | None, max_restarts: int) -> dict | None:
    """The ``JobSpec.torchrun`` for ``--nproc-per-node`` on Modal (None: one process)."""
    from trainguard.launch.modal_backend import ModalConfigError
    from trainguard.launch.modal_backend import modal_torchrun as resolve

    try:
        return resolve(options, nproc_per_node, max_restarts)
    except ModalConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def run_modal(spec: JobSpec, options, *, detach: bool, dry_run: bool, as_json: bool,
              requires: tuple[str, ...], preflight: bool) -> None:
    """Plan, check, and (unless ``dry_run``) launch ``spec`` on Modal."""
    from trainguard.cli.preflight import print_results
    from trainguard.launch.modal_backend import ModalConfigError, build_plan, describe

    try:
        plan = build_plan(spec, options)
    except ModalConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if dry_run:
        click.echo(json.dumps(plan.to_dict(), indent=1) if as_json else describe(plan))
        return
    if preflight:
        from dataclasses import replace

        from trainguard.launch.modal_backend import preflight_target

        target = replace(preflight_target(options.packages, options.python_version),
                         files=tuple(plan.files.values()))
        try:
            results = run_preflight(spec.script, target, root=options.root or None,
                                    requires=requires, closure=plan.closure)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--require") from exc
        print_results(results)
    from trainguard.launch.modal_jobs import launch_modal

    job_id, status = launch_modal(spec, options, detach=detach, client=client(), plan=plan)
    if detach:
        click.echo(job_id)
        click.echo(f"detached on Modal; watch with `trainguard status {job_id}` or "
                   f"`trainguard logs {job_id}`", err=True)
        return
    click.echo(f"job {job_id} {status}: {JobTable().get(job_id)['message']}")
    if status != "succeeded":
        raise click.exceptions.Exit(1)


def _modal_error(exc: Exception) -> bool:
    return type(exc).__module__.startswith(("modal", "grpclib")) or isinstance(
        exc, (ConnectionError, OSError, TimeoutError))


@contextlib.contextmanager
def _talking_to_modal(what: str):
    """Modal's own errors (unreachable, refused, not found) as one line naming ``what``."""
    try:
        yield
    except Exception as exc:
        if not _modal_error(exc):
            raise
        raise TrainguardError(f"cannot {what}: {type(exc).__name__}: {exc}") from exc


def refresh(table: JobTable, job: dict) -> dict:
    """The job row, with a Modal job's status refreshed from Modal (best effort)."""
    if job.get("backend") != "modal" or job["status"] in ("succeeded", "failed", "stopped"):
        return job
    from trainguard.launch.modal_jobs import refresh as refresh_call

    try:
        refresh_call(table, job["id"], client())
    except Exception as exc:  # Modal unreachable: show the recorded state, say why
        if not _modal_error(exc):
            raise
        click.echo(f"trainguard: warning: cannot reach Modal for job {job['id']}: {exc}",
                   err=True)
        return job
    row = dict(table.get(job["id"]))
    return row | {"spec": job["spec"]}


def logs(table: JobTable, job_id: str, follow: bool = False, tail: int = 1000) -> None:
    """Print a Modal job's output (``FunctionCall.logs``); ``follow``: until it ends."""
    from trainguard.launch.modal_jobs import modal_call

    call = modal_call(table, job_id)
    if call is None:
        raise click.UsageError(f"job {job_id} has no recorded Modal call (its launch failed: "
                               f"`trainguard status {job_id}` says why)")
    with _talking_to_modal(f"read the logs of job {job_id} from Modal"):
        for text in client().logs(call["call_id"], follow=follow, tail=tail):
            click.echo(text, nl=False)
    if follow:
        refresh(table, table.get(job_id))
        click.echo(f"--- job {job_id} {table.get(job_id)['status']}", err=True)


def stop(table: JobTable, job_id: str, wait: bool = True, timeout: float = 300.0,
         now: bool = False) -> None:
    """Cancel a Modal job's call: the Run saves and commits, then the app is stopped
    (``now``: its containers are killed at once)."""
    from trainguard.launch.modal_jobs import stop as stop_call

    if wait:
        click.echo(f"stopping job {job_id}: " + ("killing its containers" if now else
                                                 "the run saves and commits first"), err=True)
    with _talking_to_modal(f"stop job {job_id} on Modal"):
        status = stop_call(table, job_id, client(), wait=wait, timeout=timeout, now=now)
    if status == "stopping":
        click.echo(f"stop requested for {job_id} (modal call cancelled); `trainguard status "
                   f"{job_id}` shows when it has ended")
        return
    click.echo(f"job {job_id} {status}: {table.get(job_id)['message']}")
