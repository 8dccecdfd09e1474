"""``trainguard export``: one checkpoint's model as a plain state_dict file.

::

    trainguard export runs/lm --best val_loss --mode min lm.safetensors
    trainguard export runs/lm --step 1200 --key ema model.pt      # .pt: torch.save

The file holds the tracked module's ``state_dict`` and nothing else (no optimizer, no
trainguard entry), so any tool opens it: ``safetensors.torch.load_file(path)``, or
``torch.load(path, weights_only=True)`` for ``.pt``. safetensors is the default; a
``.pt``/``.pth`` name or ``--format pt`` asks for ``torch.save``. The file is written
beside OUT and renamed into place: a failed export never leaves half a file at OUT.

Registers itself on the ``trainguard`` group (imported at the end of
``trainguard.cli``).
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import click

from trainguard._units import human_bytes
from trainguard.cli.checkpoints import open_run
from trainguard.errors import CheckpointNotFound

if TYPE_CHECKING:  # the checkpoint layer (torch) loads when the command runs
    from trainguard.checkpoint import CheckpointInfo, CheckpointManager

RUN_ENTRY = "trainguard"  # the Run's own entry (trainguard.run.state.RUN_KEY): never a model


def _choose(manager: CheckpointManager, infos: list[CheckpointInfo], run_dir: str,
            step: int | None, best: str | None, mode: str) -> CheckpointInfo:
    if step is not None:
        found = next((i for i in infos if i.step == step), None)
        if found is None or not found.valid:
            steps = [i.step for i in infos if i.valid]
            raise CheckpointNotFound(f"{run_dir} has no valid checkpoint at step {step}; "
                                     f"valid steps: {steps}")
        return found
    if best is not None:
        found = manager.best(best, mode)
        if found is None:
            names = sorted({name for i in infos if i.valid for name in i.metrics})
            raise CheckpointNotFound(f"no checkpoint in {run_dir} recorded {best!r} "
                                     f"(metrics recorded: {names or 'none'}); log it with "
                                     f"run.log({best}=...) in the step that is saved")
        return found
    found = manager.latest_valid()
    if found is None:
        raise CheckpointNotFound(f"{run_dir} holds no valid checkpoint")
    return found


def _entry(state: dict, key: str | None) -> tuple[str, dict]:
    """The state_dict to export: ``key``, else "model", else the only dict of tensors."""
    import torch

    def tensors_only(value: object) -> bool:
        return isinstance(value, dict) and bool(value) and all(
            isinstance(v, torch.Tensor) for v in value.values())

    candidates = [k for k, v in state.items() if k != RUN_ENTRY and tensors_only(v)]
    if key is None:
        key = "model" if "model" in state else (candidates[0] if len(candidates) == 1
                                                 else None)
    if key is None or key == RUN_ENTRY or not isinstance(state.get(key), dict):
        raise click.UsageError(f"say which tracked object to export: --key NAME, one of "
                               f"{candidates or sorted(k for k in state if k != RUN_ENTRY)}")
    return key, state[key]


def _write(path: str, tensors: dict, fmt: str, metadata: dict[str, str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", dir=directory)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            if fmt == "pt":
                import torch

                torch.save(tensors, f)
            else:
                import safetensors.torch

                f.write(safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()},
                                               metadata=metadata))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@click.command("export")
@click.argument("run_dir")
@click.argument("out")
@click.option("--best", "best", metavar="METRIC", default=None,
              help="Export the checkpoint with the best METRIC (e.g. val_loss).")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True,
              help="Whether lower or higher --best METRIC is better.")
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="Export the checkpoint of this step (default: the newest valid one).")
@click.option("--key", default=None,
              help="Which tracked object (default: 'model', or the only module).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]), default=None,
              help="File format (default: from OUT's suffix; safetensors unless .pt/.pth).")
def export_command(run_dir: str, out: str, best: str | None, mode: str, step: int | None,
                   key: str | None, fmt: str | None) -> None:
    """Write one checkpoint's model of RUN_DIR to OUT as a plain state_dict file."""
    if best is not None and step is not None:
        raise click.UsageError("--best and --step both choose the checkpoint: pass one")
    manager, infos = open_run(run_dir)
    info = _choose(manager, infos, run_dir, step, best, mode)
    state: dict = {}
    manager.restore(state, step=info.step)  # into no live objects: plain values, verified
    name, tensors = _entry(state, key)
    fmt = fmt or ("pt" if out.endswith((".pt", ".pth")) else "safetensors")
    bad = [k for k, v in tensors.items() if type(v).__module__.split(".")[0] != "torch"]
    if fmt == "safetensors" and bad:
        raise click.UsageError(f"{name} holds non-tensor entries {bad[:3]}; safetensors "
                               f"stores tensors only: use --format pt")
    metadata = {"trainguard_run": manager.store.url, "trainguard_step": str(info.step),
                **{f"metric_{k}": repr(v) for k, v in info.metrics.items()}}
    _write(out, tensors, fmt, metadata)
    size = sum(v.numel() * v.element_size() for v in tensors.values() if hasattr(v, "numel"))
    chosen = f" ({best}={info.metrics[best]:.6g}, best by {mode})" if best else ""
    click.echo(f"exported {name} of step {info.step}{chosen}: {len(tensors)} tensors, "
               f"{human_bytes(size)} to {out} ({fmt})")
