"""Retention carried out: deleting what a policy does not keep, safely.

A policy (``retention.py``) says which valid checkpoints to keep; :func:`prune` deletes
the rest, and the leftovers of interrupted saves, under these rules (each tested):

* the newest valid checkpoint, and the newest one a resume would pick, are never deleted,
  whatever the policy says, nor any step in ``protect`` (the one just written);
* a delete un-commits first (``commit.unpublish``), then deletes the files;
* files of a deleted checkpoint that a kept incremental checkpoint reads stay, in a
  directory marked retired, until nothing references them;
* the writer's lock is confirmed before the first delete: a writer that lost the run to
  another deletes nothing of it.
"""

from __future__ import annotations

import logging

from trainguard.checkpoint import commit
from trainguard.checkpoint.catalog import CheckpointInfo, scan
from trainguard.checkpoint.format import CHECKPOINTS_DIR, MANIFEST, RETIRED, step_dir
from trainguard.checkpoint.retention import RetentionPolicy
from trainguard.store.base import Store, TempCleaning

log = logging.getLogger("trainguard.checkpoint")


def prune(store: Store, policy: RetentionPolicy, guard: commit.WriterGuard, *,
          protect: set[int], dry_run: bool = False) -> list[CheckpointInfo]:
    """Delete what ``policy`` does not keep (and interrupted saves); returns the deleted
    checkpoints (with ``dry_run``: those that would be)."""
    catalog = scan(store)
    valid = catalog.valid
    keep = set(policy(valid)) | protect
    if valid:
        keep.add(valid[-1].step)  # never delete the newest valid checkpoint...
        resumable = [c for c in valid if c.resumable]
        if resumable:
            keep.add(resumable[-1].step)  # ...nor the newest one resume would pick
    # Files of deleted checkpoints that kept (incremental) ones still read from.
    referenced = {(ref.step, ref.name) for c in valid if c.step in keep
                  for ref in c.manifest.refs}
    doomed = [c for c in catalog.checkpoints if c.step not in keep]
    for info in doomed:
        why = "not kept by policy" if info.valid else info.problem
        log.info("%s checkpoint step %d (%s)", "would delete" if dry_run else "deleting",
                 info.step, why)
    strays = _strays([c for c in valid if c.step in keep], catalog.names, referenced)
    if dry_run or not (doomed or catalog.retired or strays):
        return doomed
    guard.confirm()  # a writer that lost the run deletes nothing of it
    for info in doomed:
        delete_checkpoint(store, info.step, referenced)
    for step in catalog.retired:
        delete_checkpoint(store, step, referenced)
    for key in strays:  # files of interrupted saves of a step committed since
        store.delete(key)
    if strays:
        store.commit()
    if isinstance(store, TempCleaning):
        store.remove_temp_files(CHECKPOINTS_DIR)
    return doomed


def delete_checkpoint(store: Store, step: int, referenced: set[tuple[int, str]]) -> None:
    """Delete a checkpoint directory, keeping files that kept checkpoints reference."""
    key = step_dir(step)
    keep = {name for s, name in referenced if s == step}
    keys = store.list(key)
    manifest = f"{key}/{MANIFEST}"
    if keep:  # marked before the un-commit: never taken for an interrupted save
        commit.retire(store, step, "files referenced by later incremental checkpoints")
        keep.add(RETIRED)
    if manifest in keys:  # un-commit first: a crash mid-delete leaves no half checkpoint
        commit.unpublish(store, step)
    for file_key in keys:
        if file_key != manifest and file_key[len(key) + 1:] not in keep:
            store.delete(file_key)
    store.commit()


def _strays(kept: list[CheckpointInfo], names: dict[int, list[str]],
            referenced: set[tuple[int, str]]) -> list[str]:
    """Keys in committed, kept step directories that no manifest names: what interrupted
    saves of those steps left (every save names its files uniquely, so they are not a
    committed checkpoint's files, nor can a save in flight write there: its manifest
    could not be created over the committed one)."""
    out = []
    for info in kept:
        own = set(info.manifest.files) | {MANIFEST, RETIRED}
        own |= {name for step, name in referenced if step == info.step}
        out += [f"{info.key}/{name}" for name in names.get(info.step, []) if name not in own]
    return out
