"""What checkpoints a run directory holds: the cheap check every reader starts from.

:func:`scan` lists ``checkpoints/`` once and sorts what it finds into checkpoints (each a
:class:`CheckpointInfo`, valid or with its problem), retired directories (files that
later incremental checkpoints still read) and every step directory's file names. The
check is cheap: the manifest parses into the schema and every file it names is present
with the recorded size. Every byte is checked by the reader (``reader.verify``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from trainguard.checkpoint.format import (
    CHECKPOINTS_DIR,
    MANIFEST,
    RETIRED,
    Manifest,
    parse_step_dir,
    read_manifest,
    step_dir,
)
from trainguard.checkpoint.retention import keep_best
from trainguard.errors import CheckpointCorrupt, CheckpointNotFound, UnsafePath
from trainguard.store.base import Store


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known about one checkpoint directory.

    Attributes:
        step: the step in the directory name.
        key: the store key of the directory.
        manifest: the parsed ``manifest.json`` as a :class:`~trainguard.checkpoint.format.
            Manifest` (attributes, not a dict: ``.metrics``, ``.tags``, ``.reason``,
            ``.created_at``, ``.files``, ``.versions``), or None when missing/unreadable.
            ``info.metrics``, ``info.tags``, ``info.reason`` read the same fields and
            work without a manifest too.
        problem: None when the checkpoint is valid, else why it is not.
        tier: "primary", or "mirror" for the remote copy of a two-tier manager.
    """

    step: int
    key: str
    manifest: Manifest | None
    problem: str | None = None
    tier: str = "primary"

    @property
    def valid(self) -> bool:
        """True when the manifest parsed and every file checked out."""
        return self.problem is None and self.manifest is not None

    @property
    def resumable(self) -> bool:
        """False for a checkpoint saved mid-step after an error (tag ``resumable=false``):
        kept for inspection, never picked by an automatic resume."""
        return self.manifest is None or self.manifest.tags.get("resumable") != "false"

    @property
    def created_at(self) -> float:
        return self.manifest.created_at if self.manifest else 0.0

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics if self.manifest else {}

    @property
    def tags(self) -> dict:
        return self.manifest.tags if self.manifest else {}

    @property
    def reason(self) -> str:
        return self.manifest.reason if self.manifest else "unknown"

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes if self.manifest else 0


@dataclass
class Catalog:
    """One listing of a run directory's ``checkpoints/``.

    Attributes:
        url: the store listed.
        checkpoints: every step directory that is not retired, oldest first.
        retired: retired step directories -> the names of their remaining files.
        names: every step directory -> the names of its files.
    """

    url: str = ""
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    retired: dict[int, list[str]] = field(default_factory=dict)
    names: dict[int, list[str]] = field(default_factory=dict)

    @property
    def valid(self) -> list[CheckpointInfo]:
        """The valid checkpoints, oldest first."""
        return [info for info in self.checkpoints if info.valid]

    def get(self, step: int) -> CheckpointInfo:
        """The checkpoint of ``step``.

        Raises:
            CheckpointNotFound: there is no directory for ``step``.
        """
        for info in self.checkpoints:
            if info.step == step:
                return info
        raise CheckpointNotFound(f"no checkpoint at step {step} in {self.url}")


def scan(store: Store) -> Catalog:
    """List ``store``'s checkpoints once, each cheaply checked (see module docs)."""
    catalog = Catalog(store.url)
    for key in store.list(CHECKPOINTS_DIR):
        parts = key.split("/")
        if len(parts) < 3:
            continue
        step = parse_step_dir(parts[1])
        if step is not None:
            catalog.names.setdefault(step, []).append("/".join(parts[2:]))
    for step, names in sorted(catalog.names.items()):
        if MANIFEST not in names and RETIRED in names:
            catalog.retired[step] = names
        else:
            catalog.checkpoints.append(inspect(store, step, names))
    return catalog


def inspect(store: Store, step: int, names: list[str]) -> CheckpointInfo:
    """The cheap check of one step directory holding the files ``names``."""
    key = step_dir(step)
    if MANIFEST not in names:
        return CheckpointInfo(step, key, None, "incomplete: no manifest (the save was "
                                               "interrupted before its commit)")
    try:
        manifest = read_manifest(store, f"{key}/{MANIFEST}")
    except FileNotFoundError:
        return CheckpointInfo(step, key, None, "incomplete: no manifest (deleted while "
                                               "being listed)")
    except CheckpointCorrupt as exc:
        return CheckpointInfo(step, key, None, str(exc))
    if manifest.step != step:
        return CheckpointInfo(step, key, manifest,
                              f"manifest says step {manifest.step}, directory says {step}")
    present = set(names)
    expected = [(name, f"{key}/{name}", entry.size) for name, entry in manifest.files.items()]
    expected += [(ref.key, ref.key, ref.size) for ref in manifest.refs]
    for label, file_key, size in expected:
        if file_key.startswith(f"{key}/") and label not in present:
            return CheckpointInfo(step, key, manifest, f"{label}: missing")
        try:
            actual = store.size(file_key)
        except FileNotFoundError:
            return CheckpointInfo(step, key, manifest, f"{label}: missing")
        except UnsafePath as exc:
            return CheckpointInfo(step, key, manifest, f"{label}: {exc}")
        if actual != size:
            return CheckpointInfo(step, key, manifest,
                                  f"{label}: size {actual} bytes, manifest says {size}")
    return CheckpointInfo(step, key, manifest)


def best_of(infos: Iterable[CheckpointInfo], metric: str,
            mode: str = "min") -> CheckpointInfo | None:
    """The valid checkpoint with the best ``metric``: the one ``keep_best(1, metric,
    mode)`` keeps (error checkpoints and non-finite values never count; the newest wins
    a tie), or None when no valid checkpoint has the metric.

    Raises:
        ValueError: ``mode`` is not "min" or "max", or ``metric`` is empty.
    """
    valid = [info for info in infos if info.valid]
    steps = keep_best(1, metric, mode).keep(valid)
    return next((info for info in valid if info.step in steps), None)


def newest_step(infos: Iterable[CheckpointInfo]) -> int | None:
    """The newest valid step among ``infos``, or None."""
    steps = [i.step for i in infos if i.valid]
    return max(steps) if steps else None
