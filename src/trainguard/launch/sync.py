"""Copy the newest committed checkpoint of a run to another place while it trains.

The copy appears at the destination whole or not at all (files first, manifest last),
is verified byte for byte there, and only committed checkpoints are ever copied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from trainguard.checkpoint import CheckpointInfo, CheckpointManager, keep_last
from trainguard.checkpoint.mirror import copy_checkpoint
from trainguard.errors import CheckpointCorrupt, CheckpointNotFound

log = logging.getLogger("trainguard.sync")


def sync_once(source: str, dest: str, *, keep: int = 2) -> CheckpointInfo:
    """Copy ``source``'s newest valid checkpoint to ``dest`` (if not there yet) and verify.

    Args:
        source: a run directory or store URL.
        dest: a directory or store URL; it becomes a run directory of copies.
        keep: copies kept at ``dest`` (older ones are pruned).

    Raises:
        CheckpointNotFound: ``source`` has no valid checkpoint yet.
        CheckpointCorrupt: the copy did not verify (it is not left behind as valid).
    """
    src = CheckpointManager(source)
    dst = CheckpointManager(dest)
    try:
        return _sync(src, dst, source, dest, keep)
    finally:
        dst.close()  # its writer lock (an object store's lease) is taken by gc


def _sync(src: CheckpointManager, dst: CheckpointManager, source: str, dest: str,
          keep: int) -> CheckpointInfo:
    for _attempt in range(3):  # the newest may be deleted by retention mid-copy: take the next
        latest = src.latest_valid()
        if latest is None:
            raise CheckpointNotFound(f"{source} has no committed checkpoint yet")
        have = {i.step for i in dst.list() if i.valid}
        if latest.step in have and dst.verify(latest.step).valid:
            checked = dst.verify(latest.step)
        else:
            if copy_checkpoint(src.store, dst.store, latest.step) is None:
                continue  # retention deleted it mid-copy: take the next newest
            checked = dst.verify(latest.step)
        if not checked.valid:
            dst.store.delete(f"{checked.key}/manifest.json")  # never leave it looking valid
            dst.store.commit()
            raise CheckpointCorrupt(f"copy of step {latest.step} at {dest} does not verify "
                                    f"({checked.problem}); removed, retry the sync")
        dst.gc(keep_last(keep))
        return checked
    raise CheckpointNotFound(f"{source} kept deleting its newest checkpoint while copying")


def watch(source: str, dest: str, every: float, *, report: Callable[[CheckpointInfo], None],
          keep: int = 2, rounds: int | None = None,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Call :func:`sync_once` every ``every`` seconds (forever, or ``rounds`` times)."""
    done = 0
    while rounds is None or done < rounds:
        try:
            report(sync_once(source, dest, keep=keep))
        except CheckpointNotFound as exc:
            log.info("%s", exc)
        except CheckpointCorrupt as exc:  # the next round tries again
            log.warning("%s", exc)
        done += 1
        if rounds is None or done < rounds:
            sleep(every)
