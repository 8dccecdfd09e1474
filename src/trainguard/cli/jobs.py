"""``trainguard run | ps | status | logs | stop | rm | resume | sync``: jobs that survive
their launcher. Every verb goes through the job's backend (``launch/backends.py``)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import click

from trainguard._units import human_bytes, human_duration
from trainguard.errors import TrainguardError
from trainguard.launch import (
    JobSpec,
    JobTable,
    RetryPolicy,
    launch,
    parse_duration,
)
from trainguard.launch.backends import BackendUnreachable, backend_for, ended
from trainguard.launch.jobs import FINAL, holds_run_dir, live_status


class Duration(click.ParamType):
    """A duration option: ``90``, ``45s``, ``30m``, ``12h``, ``1h30m``, ``2d``."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def _env_pairs(pairs: tuple[str, ...]) -> dict:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


@click.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--run-dir", default="", help="The script's run directory (default runs/SCRIPT); "
              "exported as TRAINGUARD_RUN_DIR.")
@click.option("--name", default="", help="A label for `trainguard ps` (default: script name).")
@click.option("--detach", is_flag=True, help="Return at once; the job runs on in the background.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Failed attempts retried (preemptions do not count).")
@click.option("--retry-delay", type=DURATION, default="10s", show_default=True,
              help="Wait before the first retry.")
@click.option("--backoff", type=click.FloatRange(1, 100), default=2.0, show_default=True,
              help="Each further retry waits this many times longer.")
@click.option("--max-delay", type=DURATION, default="10m", show_default=True,
              help="Longest wait between retries.")
@click.option("--timeout", type=DURATION, default=None,
              help="Per attempt, e.g. 12h: then save, stop, and retry.")
@click.option("--hang-timeout", type=DURATION, default=None,
              help="No progress in the heartbeat for this long: stop and retry.")
@click.option("--stop-grace", type=DURATION, default="30s", show_default=True,
              help="Between SIGTERM (save and exit) and SIGKILL.")
@click.option("--gpu-hourly-usd", type=click.FloatRange(min=0), default=None,
              help="Price of the machine per hour, for cost accounting.")
@click.option("--budget-usd", type=click.FloatRange(min=0), default=None,
              help="Stop gracefully before the cost would exceed this.")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
              help="Environment variable for the script (repeatable).")
@click.option("--backend", type=click.Choice(["local", "modal"]), default="local",
              show_default=True, help="Run here under the supervisor, or on Modal.")
@click.option("--gpu", default=None, help="Modal: GPU type, TYPE:N, or a fallback list "
              "(H100:8,A100-80GB:8).")
@click.option("--volume", default=None, help="Modal: the modal.Volume holding the run.")
@click.option("--cpu", type=float, default=None, help="Modal: CPU cores.")
@click.option("--memory", type=int, default=None, help="Modal: memory in MiB.")
@click.option("--requirements", "requirements_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="Modal: requirements.txt installed in the image (with uv).")
@click.option("--pip", "packages", multiple=True, metavar="PKG",
              help="Modal: a package for the image, e.g. 'torch==2.2.2' (repeatable).")
@click.option("--root", default="", help="Project root for finding local modules "
              "(default: the script's directory).")
@click.option("--add-local", "add_local", multiple=True, metavar="PATH[:REMOTE]",
              help="Modal: a file or directory the script reads, shipped to /root/PATH (or "
              "REMOTE) in the container (repeatable).")
@click.option("--secret", "secrets", multiple=True, metavar="NAME",
              help="Modal: a modal.Secret whose keys become environment variables "
              "(repeatable).")
@click.option("--require", "requires", multiple=True, metavar="SPEC",
              help="Preflight: a version requirement, e.g. 'numpy<2' (repeatable).")
@click.option("--no-preflight", is_flag=True, help="Skip the checks run before launching.")
@click.option("--dry-run", is_flag=True, help="Modal: print the resolved plan, launch nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Start SCRIPT through torchrun with this many processes per node "
              "(Modal: at most the GPUs of --gpu; one per GPU when only --nnodes is given).")
@click.option("--nnodes", default="1", show_default=True,
              help="torchrun nodes: M, or an elastic range MIN:MAX (Modal: a cluster of M "
              "containers).")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="torchrun rendezvous endpoint (needed with several nodes).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="torchrun's elastic restarts inside one attempt.")
@click.option("--rdma", is_flag=True, help="Modal, with --nnodes 2 or more: RDMA networking "
              "between the cluster's nodes.")
@click.pass_context
def run_command(ctx, script, script_args, run_dir, name, detach, retries, retry_delay, backoff,
                max_delay, timeout, hang_timeout, stop_grace, gpu_hourly_usd, budget_usd,
                env_pairs, backend, gpu, volume, cpu, memory, requirements_file, packages,
                root, add_local, secrets, requires, no_preflight, dry_run, as_json,
                nproc_per_node, nnodes, rdzv_endpoint, max_restarts, rdma) -> None:
    """Run SCRIPT under a supervisor: retries, timeouts, hang detection, always resume.

    Arguments after `--` go to the script:
    trainguard run train.py --retries 5 --timeout 12h -- --lr 3e-4
    """
    torchrun = options = None
    if backend == "modal":  # --nnodes sizes a Modal cluster; torchrun runs on each node
        from trainguard.cli import modal_cli

        options = modal_cli.modal_options(volume=volume, gpu=gpu, cpu=cpu, memory=memory,
                                          packages=packages, requirements_file=requirements_file,
                                          root=root, nnodes=nnodes, rdma=rdma,
                                          rdzv_endpoint=rdzv_endpoint, add_local=add_local,
                                          secrets=secrets)
        torchrun = modal_cli.modal_torchrun(options, nproc_per_node, max_restarts)
    elif nproc_per_node is not None or nnodes != "1" or rdzv_endpoint:
        torchrun = {"nproc_per_node": nproc_per_node or 1, "nnodes": nnodes,
                    "rdzv_endpoint": rdzv_endpoint, "max_restarts": max_restarts}
    try:
        spec = JobSpec(script, tuple(script_args), run_dir=run_dir, name=name,
                       retry=RetryPolicy(retries, retry_delay, backoff, max_delay),
                       timeout=timeout, hang_timeout=hang_timeout, stop_grace=stop_grace,
                       gpu_hourly_usd=gpu_hourly_usd, budget_usd=budget_usd,
                       env=_env_pairs(env_pairs), torchrun=torchrun)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="SCRIPT") from exc
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if backend == "modal":
        if ctx.get_parameter_source("max_delay") == click.core.ParameterSource.DEFAULT:
            spec = dataclasses.replace(spec, retry=dataclasses.replace(spec.retry, max_delay=60))
        modal_cli.run_modal(spec, options, detach=detach, dry_run=dry_run, as_json=as_json,
                            requires=requires, preflight=not no_preflight)
        return
    if dry_run or gpu or volume or rdma or add_local or secrets:
        raise click.UsageError("--dry-run, --gpu, --volume, --rdma, --add-local and --secret "
                               "need --backend modal")
    if not no_preflight:
        _local_preflight(spec, root, requires)
    if detach:
        job_id, _ = launch(spec, detach=True)
        click.echo(job_id)
        click.echo(f"detached; watch with `trainguard status {job_id}` or "
                   f"`trainguard logs {job_id} -f`", err=True)
        return
    from trainguard.cli.foreground import run_in_foreground

    run_in_foreground(spec)  # streams the output; exits with the job's code


def _local_preflight(spec: JobSpec, root: str, requires: tuple[str, ...]) -> None:
    """Imports and version pins, checked before a local launch (failures only are printed)."""
    from trainguard.cli.preflight import print_results
    from trainguard.preflight import PreflightTarget, run_preflight

    try:
        results = run_preflight(spec.script, PreflightTarget("local"), root=root or None,
                                requires=requires)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--require") from exc
    if not all(r.ok for r in results):
        print_results(results)


def _age(ts: float | None) -> str:
    return human_duration(time.time() - ts) if ts else "-"


def _running(job: dict) -> bool:
    return job["status"] in ("running", "pending")


def _eta(job: dict) -> str:
    if (_running(job) and job.get("speed") and job.get("total")
            and job.get("step") is not None):
        return human_duration((job["total"] - job["step"]) / job["speed"])
    return "-"


def _speed(job: dict) -> str:
    return f"{job['speed']:.2f}/s" if _running(job) and job.get("speed") else "-"


def _summary(job: dict) -> str:
    step = f"{job['step']}/{job['total'] or '?'}" if job.get("step") is not None else "-"
    commit = job.get("last_commit_step")
    return (f"{job['id']} {live_status(job)} attempt {job['attempt']} step {step} commit "
            f"{commit if commit is not None else '-'} ({_age(job.get('last_commit_at'))} ago)"
            f" speed {_speed(job)} eta {_eta(job)} cost ${job.get('cost_usd') or 0:.2f}")


def _fresh(table: JobTable, job: dict) -> dict:
    """The job as its backend sees it now; the recorded row, with a warning, when the
    backend cannot be reached."""
    try:
        return backend_for(table, job).refresh(job)
    except BackendUnreachable as exc:
        click.echo(f"trainguard: warning: {exc} (showing what was recorded)", err=True)
        return job | {"status": live_status(job)}


def _row(job: dict) -> dict:
    spec = JobSpec.from_json(job["spec"]) if isinstance(job["spec"], str) else job["spec"]
    out = {k: v for k, v in job.items() if k != "spec"}
    out["retries"] = spec.retry.retries
    out["script"] = spec.script
    if not _running(job):
        out["speed"] = None
    projected = None
    if job.get("cost_usd") and job.get("step") and job.get("total"):
        projected = job["cost_usd"] * job["total"] / job["step"]
    out["projected_cost_usd"] = projected
    return out


_SHOWN_STATUSES = ("pending", "running", "retrying", "succeeded", "failed", "stopped", "lost")


@click.command("ps")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@click.option("--all", "show_all", is_flag=True,
              help="Include finished jobs older than a day (hidden by default).")
@click.option("--status", "statuses", multiple=True, type=click.Choice(_SHOWN_STATUSES),
              help="Only jobs with this status (repeatable; implies --all).")
def ps_command(as_json: bool, show_all: bool, statuses: tuple[str, ...]) -> None:
    """List jobs: status, attempt, step, commit age, heartbeat age, speed, ETA, cost.

    Finished jobs older than a day are hidden unless --all or --status is given;
    `trainguard rm JOB` forgets a job for good.
    """
    table = JobTable()
    recent = time.time() - 86400
    jobs = [_fresh(table, j) for j in table.all()
            if show_all or statuses or j["status"] not in FINAL or j["updated"] > recent]
    rows = [_row(j) for j in jobs if not statuses or j["status"] in statuses]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'JOB':8}  {'NAME':14}  {'STATUS':9}  {'ATTEMPT':7}  {'STEP':>11}  "
               f"{'COMMIT':>13}  {'BEAT':>6}  {'SPEED':>7}  {'ETA':>6}  COST")
    for r in rows:
        step = f"{r['step']}/{r['total'] or '?'}" if r.get("step") is not None else "-"
        commit = (f"{r['last_commit_step']} {_age(r['last_commit_at'])}"
                  if r.get("last_commit_step") is not None else "-")
        cost = f"${r['cost_usd'] or 0:.2f}" + (f"/${r['projected_cost_usd']:.2f}"
                                               if r.get("projected_cost_usd") else "")
        beat = _age(r.get("last_heartbeat")) if _running(r) else "-"
        click.echo(f"{r['id']:8}  {(r['name'] or '')[:14]:14}  {r['status']:9}  "
                   f"{r['attempt']}/{r['retries'] + 1:<5}  {step:>11}  {commit:>13}  "
                   f"{beat:>6}  {_speed(r):>7}  {_eta(r):>6}  {cost}")
    if not rows and (statuses or not show_all) and table.all():
        click.echo("(no job matches; `trainguard ps --all` lists every job)", err=True)


def _exit_text(code: int | None) -> str:
    """An attempt's exit code as a person reads it (a negative one: the signal)."""
    if code is None:
        return "exit code -"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@click.command("status")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def status_command(job: str, as_json: bool) -> None:
    """Details of JOB (an id or its unique prefix) and every attempt."""
    table = JobTable()
    job_id = table.resolve(job)
    current = _fresh(table, table.get(job_id))
    row = _row(current)
    attempts = table.attempts(job_id)
    if as_json:
        row["attempts"] = [a.__dict__ for a in attempts]
        click.echo(json.dumps(row, indent=1, default=str))
        return
    click.echo(_summary(current))
    click.echo(f"  script   {row['script']}\n  run dir  {row['run_dir']}\n"
               f"  message  {row.get('message') or '-'}\n  logs     {table.job_dir(job_id)}")
    for a in attempts:
        took = human_duration((a.ended or time.time()) - a.started)
        ended = _exit_text(a.exit_code)
        ended = a.reason if a.reason and ended in a.reason else f"{ended} ({a.reason or 'running'})"
        click.echo(f"  attempt {a.n}: {time.strftime('%H:%M:%S', time.localtime(a.started))} "
                   f"for {took}, {ended}")


class Since(click.ParamType):
    """``--since``: a duration back from now (``10m``, ``2h``) or a local time
    (``14:30``, ``2026-12-02 14:30``)."""

    name = "since"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return time.time() - parse_duration(value)
        except ValueError:
            pass
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S",
                    "%Y-%m-%d", "%H:%M:%S", "%H:%M"):
            try:
                parsed = time.strptime(value, fmt)
            except ValueError:
                continue
            if not fmt.startswith("%Y"):  # a time of day: today's
                today = time.localtime()
                parsed = time.struct_time((today.tm_year, today.tm_mon, today.tm_mday,
                                           parsed.tm_hour, parsed.tm_min, parsed.tm_sec,
                                           0, 0, -1))
            return time.mktime(parsed)
        self.fail(f"{value!r} is neither a duration (10m, 2h, 1d) nor a time "
                  f"(14:30, 2026-12-02 14:30)", param, ctx)


@click.command("logs")
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@click.option("-n", "--tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="Only the last N lines (Modal: entries).")
@click.option("--since", type=Since(), default=None, metavar="WHEN",
              help="Only output written since WHEN: 10m, 2h (ago) or a time, 14:30.")
@click.option("--attempt", type=click.IntRange(min=1), default=None,
              help="Which attempt (default: the latest; with --since, every attempt since).")
def logs_command(job: str, follow: bool, tail: int | None, since: float | None,
                 attempt: int | None) -> None:
    """Print the output of JOB: its latest attempt's, or what --tail and --since select."""
    table = JobTable()
    current = table.get(table.resolve(job))
    backend = backend_for(table, current)
    for text in backend.logs(current, follow=follow, tail=tail, since=since, attempt=attempt):
        sys.stdout.write(text)
        sys.stdout.flush()
    if follow:
        end = _fresh(table, table.get(current["id"]))
        click.echo(f"--- job {end['id']} {end['status']}: {end.get('message') or '-'}",
                   err=True)


@click.command("stop")
@click.argument("job")
@click.option("--now", is_flag=True, help="Kill at once instead of letting it save first.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the job has stopped.")
def stop_command(job: str, now: bool, wait: bool) -> None:
    """Stop JOB: it saves and commits a checkpoint, then ends with status stopped."""
    table = JobTable()
    current = table.get(table.resolve(job))
    if current["status"] in FINAL:
        click.echo(f"job {current['id']} already {current['status']}")
        return
    click.echo(backend_for(table, current).stop(current, now=now, wait=wait))


@click.command("rm")
@click.argument("jobs", nargs=-1)
@click.option("--lost", "lost", is_flag=True,
              help="Every lost job (its supervisor died and nothing of it still runs).")
def rm_command(jobs: tuple[str, ...], lost: bool) -> None:
    """Forget JOBS: their entries in `ps` and their logs. Their run directories and
    checkpoints are kept. A job that still runs is refused: `trainguard stop` it first."""
    table = JobTable()
    if not jobs and not lost:
        raise click.UsageError("name the jobs to forget (`trainguard rm JOB ...`), or "
                               "--lost for every lost one")
    targets = [table.get(table.resolve(j)) for j in jobs]
    if lost:
        targets += [j for j in table.all() if live_status(j) == "lost" and ended(j)
                    and j["id"] not in {t["id"] for t in targets}]
        targets = [table.get(j["id"]) for j in targets]
    for job in targets:
        job = _fresh(table, job)
        backend_for(table, job).forget(job)
        table.delete(job["id"], holds=holds_run_dir)
        click.echo(f"removed job {job['id']} ({job['status']}); its run directory "
                   f"{job['run_dir']} is kept")
    if lost and not targets:
        click.echo("no lost job")


@click.command("resume")
@click.argument("job")
@click.option("--detach", is_flag=True, help="Return at once; the job runs on in the background.")
def resume_command(job: str, detach: bool) -> None:
    """Start an ended (failed, stopped, lost) JOB again with its own spec: its attempts go
    on from the last, with a fresh retry budget, and its run resumes from its newest
    committed checkpoint."""
    table = JobTable()
    current = _fresh(table, table.get(table.resolve(job)))
    if current["status"] == "succeeded":
        raise TrainguardError(f"job {current['id']} succeeded: there is nothing to resume; "
                              f"`trainguard run` starts a new job")
    backend = backend_for(table, current)
    if detach:
        backend.resume(current, detach=True)
        click.echo(current["id"])
        click.echo(f"resumed; watch with `trainguard status {current['id']}` or "
                   f"`trainguard logs {current['id']} -f`", err=True)
        return
    from trainguard.cli.foreground import supervise_in_foreground

    supervise_in_foreground(table, lambda view: (
        current["id"], backend.resume(current, detach=False, on_tick=view)))


@click.command("sync")
@click.argument("source")
@click.argument("dest")
@click.option("--watch", "every", type=DURATION, default=None,
              help="Repeat every interval (e.g. 20m) until interrupted.")
@click.option("--keep", type=click.IntRange(min=1), default=2, show_default=True,
              help="Copies kept at DEST.")
def sync_command(source: str, dest: str, every: float | None, keep: int) -> None:
    """Copy the newest committed checkpoint of SOURCE (a run dir, store URL or job id)
    to DEST, where it appears whole or not at all, and verify it there."""
    from trainguard.launch import sync_once, watch

    if "://" not in source and not os.path.exists(source):
        table = JobTable()
        source = table.get(table.resolve(source))["run_dir"]

    def report(info) -> None:
        click.echo(f"{dest}: step {info.step} ({human_bytes(info.total_bytes)}) verified")

    if every is None:
        report(sync_once(source, dest, keep=keep))
        return
    try:
        watch(source, dest, every, report=report, keep=keep)
    except KeyboardInterrupt:
        click.echo("stopped watching", err=True)

