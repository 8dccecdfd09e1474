"""``trainguard preflight SCRIPT``: the checks that fail in seconds, before GPU time is paid.

The same checks run automatically before every ``trainguard run`` (``--no-preflight``
skips them). Each prints ``✓`` or ``✗`` with a one-line fix; any ``✗`` exits with 6.
"""

from __future__ import annotations

import re

import click

from trainguard.preflight import CheckResult, PreflightFailed, PreflightTarget, run_preflight

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class ByteSize(click.ParamType):
    """A size option: ``500M``, ``2G``, ``1.5GiB`` or a number of bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = _SIZE.match(str(value))
        if not match:
            self.fail(f"cannot read {value!r} as a size; use e.g. 500M, 2G or 1048576", param, ctx)
        scale = 1024 ** " kmgt".index(match.group(2).lower() or " ")
        return int(float(match.group(1)) * scale)


def print_results(results: list[CheckResult]) -> None:
    """Print one ✓/✗ line per check (with its fix); raise PreflightFailed on any ✗."""
    for result in results:
        click.echo(result.line())
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise PreflightFailed(f"preflight: {len(failed)} check(s) failed ({', '.join(failed)}); "
                              "fix them and run again (--no-preflight skips the checks)")


def local_target(run_dir: str, gpu: int, checkpoint_bytes: int) -> PreflightTarget:
    """The preflight target of a local launch: the run dir's store and disk."""
    from trainguard.store import open_store

    return PreflightTarget("local", gpu=gpu, store=open_store(run_dir),
                           disk_path=run_dir if "://" not in run_dir else None,
                           checkpoint_bytes=checkpoint_bytes)


@click.command("preflight")
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.option("--backend", type=click.Choice(["local", "modal"]), default="local",
              show_default=True, help="Where the job will run.")
@click.option("--require", "requires", multiple=True, metavar="SPEC",
              help="A version requirement, e.g. 'torch==2.2.2' (repeatable).")
@click.option("--root", default="", help="Project root for the import analysis "
              "(default: the script's directory).")
@click.option("--run-dir", default="", help="Local backend: the run directory to test "
              "(default runs/SCRIPT).")
@click.option("--gpu", default=None, help="GPUs asked for: a count locally (1, 2), "
              "a Modal GPU string with --backend modal.")
@click.option("--requirements", "requirements_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Modal: requirements.txt installed in the image.")
@click.option("--pip", "packages", multiple=True, metavar="PKG",
              help="Modal: a package installed in the image (repeatable).")
@click.option("--add-local", "add_local", multiple=True, metavar="PATH[:REMOTE]",
              help="Modal: a file or directory shipped with the script (repeatable).")
@click.option("--checkpoint-size", type=ByteSize(), default=0,
              help="Expected size of one checkpoint, e.g. 2G: checks free disk for 2 of them.")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="The dataset directory to gate (its manifest is built or refreshed).")
@click.option("--data-require", multiple=True, metavar="'NAME OP NUMBER'",
              help="A condition on the dataset's totals, e.g. 'positive > 0' (repeatable).")
@click.option("--data-stats", default=None, metavar="MODULE:FUNCTION",
              help="Per-file statistics function for the dataset manifest.")
@click.option("--data-pattern", default="**/*", show_default=True,
              help="Glob of the dataset's files.")
def preflight_command(script, backend, requires, root, run_dir, gpu, requirements_file,
                      packages, add_local, checkpoint_size, data_dir, data_require,
                      data_stats, data_pattern) -> None:
    """Check that SCRIPT can start: credentials, imports, store, disk, versions, GPU."""
    import os

    if backend == "modal":
        from trainguard.launch.modal_backend import ModalConfigError, read_requirements

        packages = tuple(packages) + read_requirements(requirements_file)
        try:
            from trainguard.launch.modal_backend import validate_gpu

            validate_gpu(gpu)
        except ModalConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpu") from exc
        from dataclasses import replace

        from trainguard.launch.modal_backend import preflight_target, shipped_paths

        try:
            files = shipped_paths(script, root, add_local)
        except ModalConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--add-local") from exc
        target = replace(preflight_target(packages), files=files)
    else:
        stem = os.path.splitext(os.path.basename(script))[0]
        count = int(gpu) if gpu and gpu.isdigit() else (1 if gpu else 0)
        target = local_target(run_dir or f"runs/{stem}", count, checkpoint_size)
    if data_dir is not None:
        from dataclasses import replace

        from trainguard.data_manifest import DataGate

        try:
            gate = DataGate(data_dir, stats=data_stats, require=data_require,
                            pattern=data_pattern)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--data-require") from exc
        target = replace(target, data_gate=gate)
    try:
        results = run_preflight(script, target, root=root or None, requires=requires)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--require") from exc
    print_results(results)
