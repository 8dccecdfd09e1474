"""Data manifests: no run starts on an empty, stale or wrong dataset cache.

A manifest records every file of a dataset directory (size, mtime, optionally a
checksum) and per-file user statistics (class counts, positive windows, rows...) from a
user function, summed into totals. Before training, a :class:`DataGate` checks that the
manifest is fresh (no file missing, changed, added or empty) and that the totals satisfy
the run's requirements (``"positive > 0"``); a stale manifest is rebuilt first
(``TRAINGUARD_FORCE_MANIFEST_REBUILD=1`` forces that). A failing gate raises
:class:`~trainguard.errors.DataGateFailed` with the counts, before any GPU time is spent.

Example::

    def count_labels(path):            # per-file statistics, any numbers
        labels = np.load(path)["y"]
        return {"windows": len(labels), "positive": int(labels.sum())}

    gate = DataGate("cache/windows", stats=count_labels, require=["positive > 0"])
    manifest = gate.check()             # raises DataGateFailed naming the counts
"""

from __future__ import annotations

import importlib
import json
import operator
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

from trainguard.errors import DataGateFailed

MANIFEST_NAME = ".trainguard-data.json"
FORCE_ENV = "TRAINGUARD_FORCE_MANIFEST_REBUILD"
StatsFn = Callable[[Path], dict]
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
        "==": operator.eq, "!=": operator.ne}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.eE+-]+)\s*$")


@dataclass(frozen=True)
class FileRecord:
    """One file of the dataset as it was when the manifest was built."""

    path: str
    size: int
    mtime_ns: int
    checksum: str | None = None
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataManifest:
    """The recorded state of a dataset directory and the totals of its statistics."""

    files: tuple[FileRecord, ...]
    pattern: str = "**/*"
    hashed: bool = False
    stats_fn: str | None = None  # "module:function", so `scan` can recompute
    created_at: float = 0.0

    @property
    def totals(self) -> dict[str, float]:
        """``files``, ``bytes``, ``empty_files`` plus every user statistic, summed."""
        totals: dict[str, float] = {"files": len(self.files),
                                    "bytes": sum(f.size for f in self.files),
                                    "empty_files": sum(1 for f in self.files if f.size == 0)}
        for record in self.files:
            for name, value in record.stats.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def save(self, root: str | os.PathLike) -> Path:
        """Write the manifest into ``root`` (atomically); returns its path."""
        path = Path(root) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        doc = {**asdict(self), "files": [asdict(f) for f in self.files], "totals": self.totals}
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: str | os.PathLike) -> DataManifest | None:
        """The manifest stored in ``root``, or None when there is none (or unreadable)."""
        try:
            doc = json.loads((Path(root) / MANIFEST_NAME).read_text())
            files = tuple(FileRecord(**f) for f in doc["files"])
            return cls(files=files, pattern=doc.get("pattern", "**/*"),
                       hashed=bool(doc.get("hashed")), stats_fn=doc.get("stats_fn"),
                       created_at=float(doc.get("created_at", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _data_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern)
                  if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp"))


def _hash_file(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_stats_fn(spec: str) -> StatsFn:
    """Import ``"package.module:function"`` (the user's own statistics function)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"stats function {spec!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import stats function {spec!r}: {exc}") from exc


def _spec_of(stats: StatsFn | str | None) -> tuple[StatsFn | None, str | None]:
    if stats is None:
        return None, None
    if isinstance(stats, str):
        return load_stats_fn(stats), stats
    return stats, f"{stats.__module__}:{stats.__qualname__}"


def build(root: str | os.PathLike, *, pattern: str = "**/*", stats: StatsFn | str | None = None,
          hashed: bool = False, progress: Callable[[int, int], None] | None = None) -> DataManifest:
    """Scan ``root`` and write its manifest.

    Args:
        root: the dataset directory.
        pattern: glob of the files that make up the dataset.
        stats: per-file statistics, a function or ``"module:function"``.
        hashed: also checksum every file (catches same-size, same-mtime rewrites).
        progress: called with (files done, files total).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset directory {base} does not exist")
    stats_fn, spec = _spec_of(stats)
    files = _data_files(base, pattern)
    records = []
    for i, path in enumerate(files, 1):
        info = path.stat()
        user = {k: float(v) for k, v in (stats_fn(path) or {}).items()} if stats_fn else {}
        records.append(FileRecord(path.relative_to(base).as_posix(), info.st_size,
                                  info.st_mtime_ns, _hash_file(path) if hashed else None, user))
        if progress:
            progress(i, len(files))
    manifest = DataManifest(tuple(records), pattern, hashed, spec, time.time())
    manifest.save(base)
    return manifest


def validate(manifest: DataManifest, root: str | os.PathLike) -> list[str]:
    """Why ``manifest`` no longer describes ``root`` (empty list: it is fresh)."""
    base = Path(root)
    problems = []
    recorded = {f.path: f for f in manifest.files}
    present = {p.relative_to(base).as_posix(): p for p in _data_files(base, manifest.pattern)}
    for rel in sorted(set(recorded) - set(present)):
        problems.append(f"missing: {rel}")
    for rel in sorted(set(present) - set(recorded)):
        problems.append(f"new file not in the manifest: {rel}")
    for rel in sorted(set(recorded) & set(present)):
        record, info = recorded[rel], present[rel].stat()
        if info.st_size == 0:
            problems.append(f"empty: {rel}")
        elif info.st_size != record.size or info.st_mtime_ns != record.mtime_ns:
            problems.append(f"changed: {rel}")
        elif manifest.hashed and _hash_file(present[rel]) != record.checksum:
            problems.append(f"changed (checksum): {rel}")
    if not manifest.files and not present:
        problems.append(f"{base} has no data files (matching {manifest.pattern!r}): put the "
                        f"data there, or fix the path or the pattern")
    elif not manifest.files:
        problems.append("the manifest lists no files")
    return problems


def no_data(problems: list[str]) -> bool:
    """Whether ``problems`` (from :func:`validate`) say the directory holds no data at all:
    rebuilding the manifest cannot fix that."""
    return any(" has no data files " in p for p in problems)


def check_requirements(totals: dict[str, float], require: Sequence[str]) -> list[str]:
    """The requirements (``"positive > 0"``) that ``totals`` fails, each with its value.

    Raises:
        ValueError: a requirement is not of the form ``NAME OP NUMBER``.
    """
    failed = []
    for text in require:
        match = _REQUIREMENT.match(text)
        if not match:
            raise ValueError(f"requirement {text!r} must look like 'positive > 0' "
                             f"(a total, one of {sorted(_OPS)}, a number)")
        name, op, number = match.groups()
        value = totals.get(name)
        if value is None:
            failed.append(f"{text} (no total named {name!r}; totals: {sorted(totals)})")
        elif not _OPS[op](value, float(number)):
            failed.append(f"{text} (it is {value:g})")
    return failed


@dataclass(frozen=True)
class DataGate:
    """What a run requires of its data; :meth:`check` before the first step.

    Args:
        root: the dataset directory.
        stats: per-file statistics, a function or ``"module:function"``.
        require: conditions on the totals, e.g. ``["positive > 0", "files >= 10"]``.
        pattern: glob of the dataset's files.
        hashed: checksum files too.
        rebuild_when_stale: rebuild a stale manifest instead of failing.
    """

    root: str
    stats: StatsFn | str | None = None
    require: tuple[str, ...] = ()
    pattern: str = "**/*"
    hashed: bool = False
    rebuild_when_stale: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.fspath(self.root))
        object.__setattr__(self, "require", tuple(self.require))
        for text in self.require:
            if not _REQUIREMENT.match(text):
                raise ValueError(f"requirement {text!r} must look like 'positive > 0'")

    def check(self, log: Callable[[str], None] = print) -> DataManifest:
        """Fresh manifest whose totals meet every requirement, or :class:`DataGateFailed`."""
        if not Path(self.root).is_dir():
            raise DataGateFailed(f"dataset directory {self.root} does not exist; build the "
                                 f"cache first or fix the path")
        manifest = DataManifest.load(self.root)
        forced = os.environ.get(FORCE_ENV, "") not in ("", "0")
        problems = validate(manifest, self.root) if manifest else ["no manifest yet"]
        if forced or problems:
            if not (forced or self.rebuild_when_stale):
                raise DataGateFailed(f"data manifest of {self.root} is stale: "
                                     + "; ".join(problems[:5]))
            why = f"{FORCE_ENV}=1" if forced else "; ".join(problems[:3])
            log(f"rebuilding the data manifest of {self.root} ({why})")
            manifest = build(self.root, pattern=self.pattern, stats=self.stats,
                             hashed=self.hashed)
            problems = validate(manifest, self.root)
            if problems:
                raise DataGateFailed(f"data in {self.root} is not usable: "
                                     + "; ".join(problems[:5]))
        failed = check_requirements(manifest.totals, self.require)
        if failed:
            counts = ", ".join(f"{k}={v:g}" for k, v in sorted(manifest.totals.items()))
            raise DataGateFailed(f"data in {self.root} fails {'; '.join(failed)}. "
                                 f"Totals: {counts}. Fix the data (or the requirement) "
                                 f"before spending GPU time on it.")
        return manifest
