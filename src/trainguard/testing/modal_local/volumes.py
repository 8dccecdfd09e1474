"""Modal Volumes with Modal's commit semantics, on local directories.

What is modelled, and where it comes from (modal 1.6.x):

* A container sees the volume as it was committed when the container started; its own
  writes go to its private view (``Container.view``) and are invisible to every other
  reader until it commits (``modal/volume.py`` ``_Volume.commit``: "If successful, the
  changes made are now persisted in durable storage and available to other containers
  accessing the volume").
* ``VolumeCommit`` applies the container's changes since its last sync (files written,
  changed or deleted) to the committed tree; the client then reloads unless the answer
  says ``skip_reload`` (``_Volume.commit``), so a commit also brings others' commits in.
* ``VolumeReload`` brings other containers' commits into the view ("Make latest
  committed state of volume available in the running container", ``_Volume.reload``).
  Modal says uncommitted changes "may implicitly be committed when reloading"; this model
  takes the strict reading: they stay pending (uncommitted) and are kept in the view.
* A container that ends without committing loses its uncommitted writes: the view is
  thrown away. On a clean exit the runtime itself commits first
  (``modal/_runtime/task_lifecycle_manager.py`` ``volume_commit``, called from
  ``user_code_imports.py`` ``Service.lifecycle_context`` step 8); after a SIGKILL nothing
  does.
* Readers outside containers (``Volume.listdir``/``read_file``: ``VolumeListFiles``,
  ``VolumeGetFile2``) see only the committed tree.

Not modelled: Modal's background commits every few seconds (a stricter model: nothing is
durable without a commit), reload refusing while files are open, v2 volumes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan(root: Path) -> dict[str, str]:
    """Relative path -> content digest of every regular file under ``root``."""
    out = {}
    if not root.exists():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath, name)
            if full.is_file() and not full.is_symlink():
                out[full.relative_to(root).as_posix()] = _digest(full)
    return out


def _copy(src: Path, dst: Path, tmp_dir: Path) -> None:
    """Copy a file so that readers of ``dst`` never see it half written (the copy is made
    in ``tmp_dir``, on the same file system, and renamed into place)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{dst.name}.{os.getpid()}-{threading.get_ident()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _remove(path: Path, stop: Path) -> None:
    """Remove a file and the directories it leaves empty, up to ``stop``."""
    path.unlink(missing_ok=True)
    parent = path.parent
    while parent != stop and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


class Volume:
    """One named volume: its committed tree and the views mounted by containers.

    Args:
        volume_id: ``vo-...``.
        name: the name it was created under.
        root: directory holding ``committed/`` (the durable state).
    """

    def __init__(self, volume_id: str, name: str, root: Path) -> None:
        self.volume_id, self.name = volume_id, name
        self.committed = root / "committed"
        self.committed.mkdir(parents=True, exist_ok=True)
        self.tmp = root / "tmp"
        self._lock = threading.Lock()
        self.commits = 0  # every VolumeCommit applied, for tests and the control endpoint

    def mount(self, view: Path) -> VolumeView:
        """A container's view: a copy of the committed tree at ``view``."""
        with self._lock:
            if view.exists():
                shutil.rmtree(view)
            shutil.copytree(self.committed, view)
            return VolumeView(self, view, scan(view))

    def read(self, path: str) -> bytes:
        """A committed file's bytes (``FileNotFoundError`` if not committed)."""
        full = self._resolve(path)
        if not full.is_file():
            raise FileNotFoundError(path)
        return full.read_bytes()

    def entries(self, path: str, recursive: bool) -> list[tuple[str, bool, int, float]]:
        """``(path, is_dir, size, mtime)`` of committed entries under ``path``."""
        base = self._resolve(path)
        if base.is_file():
            st = base.stat()
            return [(path.strip("/"), False, st.st_size, st.st_mtime)]
        if not base.is_dir():
            raise FileNotFoundError(path)
        found = []
        walker = base.rglob("*") if recursive else base.iterdir()
        for item in sorted(walker):
            st = item.stat()
            found.append((item.relative_to(self.committed).as_posix(), item.is_dir(),
                          st.st_size, st.st_mtime))
        return found

    def _resolve(self, path: str) -> Path:
        full = (self.committed / path.lstrip("/")).resolve()
        if full != self.committed.resolve() and self.committed.resolve() not in full.parents:
            raise FileNotFoundError(path)  # never outside the volume
        return full


class VolumeView:
    """What one container has mounted: its files, and the state it last synced with.

    ``base`` maps each file to the digest it had when the view last agreed with the
    committed tree; a file whose digest differs from ``base`` (or that ``base`` lacks)
    is an uncommitted change of this container.
    """

    def __init__(self, volume: Volume, root: Path, base: dict[str, str]) -> None:
        self.volume, self.root, self.base = volume, root, base

    def pending(self) -> tuple[dict[str, str], set[str]]:
        """(files written or changed since the last sync, files deleted since then)."""
        current = scan(self.root)
        changed = {k: v for k, v in current.items() if self.base.get(k) != v}
        deleted = {k for k in self.base if k not in current}
        return changed, deleted

    def commit(self) -> int:
        """Make this container's changes durable and visible; returns files applied."""
        with self.volume._lock:
            changed, deleted = self.pending()
            for rel in changed:
                _copy(self.root / rel, self.volume.committed / rel, self.volume.tmp)
            for rel in deleted:
                _remove(self.volume.committed / rel, self.volume.committed)
            self.volume.commits += 1
            self._sync_locked(changed, deleted)
            return len(changed) + len(deleted)

    def reload(self) -> None:
        """Bring others' commits into the view; this container's own pending changes stay."""
        with self.volume._lock:
            changed, deleted = self.pending()
            self._sync_locked(changed, deleted)

    def _sync_locked(self, changed: dict[str, str], deleted: set[str]) -> None:
        committed = scan(self.volume.committed)
        mine = set(changed) | deleted
        for rel, digest in committed.items():
            if rel not in mine and self.base.get(rel) != digest:
                _copy(self.volume.committed / rel, self.root / rel, self.volume.tmp)
        for rel in list(self.base):
            if rel not in committed and rel not in mine:
                _remove(self.root / rel, self.root)  # deleted by another container
        base = {rel: d for rel, d in committed.items() if rel not in mine}
        base.update({rel: self.base[rel] for rel in mine if rel in self.base})
        # After a commit our changes are in `committed` with the same digests: in sync.
        for rel, digest in changed.items():
            if committed.get(rel) == digest:
                base[rel] = digest
        for rel in deleted:
            if rel not in committed:
                base.pop(rel, None)
        self.base = base
