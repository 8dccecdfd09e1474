"""``trainguard run --backend modal``: options, plan, preflight, launch.

Kept apart from ``cli/jobs.py`` so the local commands never import ``modal``. The job
verbs (ps, status, logs, stop, rm, resume) reach Modal through
``launch.modal_jobs.ModalBackend``, like every backend; the Modal client through
``launch.modal_jobs.make_client`` (tests set ``CLIENT_FACTORY`` to a fake).
"""

from __future__ import annotations

import json

import click

from trainguard.launch import JobSpec, JobTable
from trainguard.preflight import run_preflight


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
    from trainguard.launch.modal_jobs import ModalBackend

    job_id, status = ModalBackend(JobTable(), options, plan=plan).launch(spec, detach=detach)
    if detach:
        click.echo(job_id)
        click.echo(f"detached on Modal; watch with `trainguard status {job_id}` or "
                   f"`trainguard logs {job_id}`", err=True)
        return
    click.echo(f"job {job_id} {status}: {JobTable().get(job_id)['message']}")
    if status != "succeeded":
        raise click.exceptions.Exit(1)
