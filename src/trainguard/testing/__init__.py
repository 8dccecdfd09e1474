"""Test doubles trainguard ships for its users' tests and rehearsals.

* :class:`MemoryStore` (``testing/memory.py``): a thread-safe in-memory
  :class:`~trainguard.store.Store` with create-if-absent and an in-process writer lock,
  so ``CheckpointManager(MemoryStore())`` runs without a disk.
* :class:`FakeClock` (``testing/clock.py``): ``monotonic()``, ``time()`` and a
  ``sleep()`` that advances the clock instead of waiting, for code that takes its clock
  and sleep as arguments (``Supervisor``, ``Backoff``, ``Run``).
* :mod:`trainguard.testing.store_conformance`: the conformance suite every store backend
  subclasses (imports pytest; import it from your tests, it is not loaded here).
* :mod:`trainguard.testing.modal_local`: a local Modal control plane speaking Modal's
  protocol (``python -m trainguard.testing.modal_local``).

Importing this package loads neither pytest nor torch.
"""

from trainguard.testing.clock import FakeClock
from trainguard.testing.memory import MemoryLock, MemoryStore

__all__ = ["FakeClock", "MemoryLock", "MemoryStore"]
