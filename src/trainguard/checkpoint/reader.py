"""Reading checkpoints back: verify every byte, then load, falling back across tiers.

Nothing is loaded before every file of the checkpoint has been read and its size and
checksum verified; a corrupt checkpoint is skipped with a warning naming the file. With
two tiers the reader also sees the mirror (a bucket), so a fresh machine resumes from
there; at equal steps the primary's copy is tried first.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from trainguard.checkpoint.catalog import CheckpointInfo, best_of, scan
from trainguard.checkpoint.format import (
    STATE_FILE,
    FileEntry,
    check_file,
    is_sharded,
    parse_safetensors,
    step_dir,
)
from trainguard.checkpoint.tree import check_tree, parse_state_file, restore_into
from trainguard.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    StateMismatch,
    StoreError,
    UnsafePath,
)
from trainguard.store.base import Store

log = logging.getLogger("trainguard.checkpoint")


class CheckpointReader:
    """Lists, verifies and restores the checkpoints of one store (and its mirror's).

    Args:
        store: the run's store.
        remote: the reader of the mirror tier, or None for one tier.
    """

    def __init__(self, store: Store, remote: CheckpointReader | None = None) -> None:
        self.store, self.remote = store, remote

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory, oldest first, cheaply checked (``catalog.scan``)."""
        return scan(self.store).checkpoints

    def remote_list(self) -> list[CheckpointInfo]:
        """The mirror's checkpoints; an unreachable mirror is logged, not fatal."""
        if self.remote is None:
            return []
        try:
            return self.remote.list()
        except StoreError as exc:
            log.warning("cannot list the mirror %s (%s); using local checkpoints only",
                        self.remote.store.url, exc)
            return []

    def candidates(self) -> list[CheckpointInfo]:
        """Checkpoints of every tier, newest first; the primary first at equal steps."""
        infos = list(self.list())
        infos += [replace(i, tier="mirror") for i in self.remote_list()]
        return sorted(infos, key=lambda i: (i.step, i.tier == "primary"), reverse=True)

    def latest_valid(self, resumable: bool = False) -> CheckpointInfo | None:
        """The newest checkpoint of any tier that passes the cheap check, or None.

        Args:
            resumable: skip checkpoints saved mid-step after an error.
        """
        for info in self.candidates():
            if info.valid and (not resumable or info.resumable):
                return info
        return None

    def best(self, metric: str, mode: str = "min") -> CheckpointInfo | None:
        """The valid checkpoint with the best ``metric`` (see ``catalog.best_of``)."""
        return best_of(self.list(), metric, mode)

    def store_of(self, info: CheckpointInfo) -> Store:
        """The store holding ``info``: the mirror's for a mirror checkpoint."""
        return self.remote.store if info.tier == "mirror" and self.remote is not None \
            else self.store

    def verify(self, step: int) -> CheckpointInfo:
        """Check every byte of the primary's checkpoint at ``step``; the result's
        ``problem`` says why it is bad (naming the file), or is None when it verifies.

        Raises:
            CheckpointNotFound: there is no directory for ``step``.
        """
        info = scan(self.store).get(step)
        if not info.valid:
            return info
        try:
            read_verified(self.store, info)
        except CheckpointCorrupt as exc:
            return CheckpointInfo(info.step, info.key, info.manifest, str(exc))
        return info

    def restore(self, state: dict, step: int | None = None) -> int:
        """Load a checkpoint into ``state`` in place; returns the restored step.

        With ``step=None`` the newest checkpoint of any tier that fully verifies is
        used; corrupt or partial ones are skipped with a warning naming the file.

        Raises:
            CheckpointNotFound: nothing valid to restore (or no checkpoint at ``step``).
            CheckpointCorrupt: the explicitly requested ``step`` does not verify.
            StateMismatch: the checkpoint does not fit ``state`` (shapes, dtypes).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of named objects, got {type(state).__name__}")
        candidates = [scan(self.store).get(step)] if step is not None else self.candidates()
        skipped = []
        for info in candidates:
            if step is None and not info.resumable:
                log.info("skipping checkpoint step %d: saved after an error in the middle of "
                         "a step (kept for inspection; restore(step=%d) loads it)",
                         info.step, info.step)
                continue
            store = self.store_of(info)
            try:
                if not info.valid:
                    raise CheckpointCorrupt(f"{info.key}: {info.problem}")
                tree, tensors = read_verified(store, info)
                if is_sharded(info.manifest):  # one process: reshard to full tensors
                    from trainguard.checkpoint.dcp import restore_state_sharded

                    return restore_state_sharded(store, state, info.step, info.manifest)
            except CheckpointCorrupt as exc:
                if step is not None:
                    raise
                log.warning("skipping checkpoint step %d: %s", info.step, exc)
                skipped.append(info.step)
                continue
            if not isinstance(tree, dict):
                raise StateMismatch(f"{info.key}/{STATE_FILE}: top level is not a dict")
            restore_into(state, tree, tensors)
            log.info("restored step %d from %s", info.step, store.url)
            return info.step
        detail = f" (skipped unusable steps: {skipped})" if skipped else ""
        raise CheckpointNotFound(f"no valid checkpoint to restore in {self.store.url}{detail}")


def read_verified(store: Store, info: CheckpointInfo) -> tuple[Any, dict[str, torch.Tensor]]:
    """Read every file of ``info``, check sizes and checksums, then parse. Nothing is
    applied. A sharded checkpoint's tensors load through DCP later: ``(None, {})``.

    Raises:
        CheckpointCorrupt: a file is missing, corrupt, or not what it should be.
    """
    assert info.manifest is not None
    files = {f"{info.key}/{name}": entry for name, entry in info.manifest.files.items()}
    files.update({ref.key: FileEntry(ref.size, ref.checksum) for ref in info.manifest.refs})
    buffers = {}
    # Files are read two at a time while this thread checks the ones already read,
    # so checksumming overlaps I/O instead of following it.
    with ThreadPoolExecutor(2, thread_name_prefix="trainguard-restore") as pool:
        reads = {key: pool.submit(store.read, key) for key in files}
        for key, future in reads.items():
            try:
                data = future.result()
            except FileNotFoundError:
                raise CheckpointCorrupt(f"{key}: missing") from None
            except UnsafePath as exc:
                raise CheckpointCorrupt(f"{key}: {exc}") from None
            check_file(key, data, files[key])
            buffers[key] = data
    if is_sharded(info.manifest):  # its tensors load through DCP (restore_state_sharded)
        from trainguard.checkpoint.dcp import read_tree

        read_tree(store, info.step, info.manifest)  # the tree's schema, before any tensor
        return None, {}
    state_key = f"{info.key}/{info.manifest.state_file}"
    if state_key not in buffers:
        raise CheckpointCorrupt(f"{info.key}: manifest lists no state file "
                                f"({info.manifest.state_file})")
    tree, tensor_refs = parse_state_file(buffers.pop(state_key), state_key)
    by_file = {key: parse_safetensors(data, key) for key, data in buffers.items()}
    tensors: dict[str, torch.Tensor] = {}
    for key, found in by_file.items():
        if key.startswith(f"{info.key}/"):
            tensors.update(found)
    for name, (ref_step, ref_file, ref_name) in tensor_refs.items():
        ref_key = f"{step_dir(ref_step)}/{ref_file}"
        try:
            tensors[name] = by_file[ref_key][ref_name]
        except KeyError:
            raise CheckpointCorrupt(f"{state_key}: tensor {name!r} refers to {ref_key}, "
                                    f"which the manifest does not list or lacks it") from None
    check_tree(tree, state_key, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    return tree, tensors
