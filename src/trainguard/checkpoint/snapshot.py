"""The part of a save that blocks training: copying tensors into host memory.

``HostArena`` is one reusable host buffer (pinned when CUDA is in use) that every save
copies its tensors into; it is allocated once and grown when the state grows, so a save
costs no allocation and its extra host memory is the state's size plus alignment. Pinned
memory is an anonymous mapping of exactly that size registered with CUDA
(``cudaHostRegister``), not torch's pinned allocator: that one rounds every block up to a
power of two (measured on an H100 host: a 19.3 GB state cost 34.5 GB of resident pinned
memory, 1.78x, and the first save stalled 25.5 s allocating it). CUDA
copies run non-blocking on a dedicated stream that first waits for the training stream,
so they see every kernel queued before ``save``; the stream is synchronized before
``save`` returns, after which the loop may mutate parameters freely.

``ChangeTracker`` lets an incremental save skip tensors that did not change since the
previous save without hashing them on the device. A tensor counts as unchanged when all
of these match what they were at the previous save:

* the same storage object (held by weak reference: memory freed and reused at the same
  address is a different object), its offset, shape, stride, dtype and device, and
* torch's version counter, which every in-place op bumps (optimizer steps, ``copy_``,
  ``add_`` under ``no_grad``, ``load_state_dict``), and
* a fingerprint of 64 evenly spaced elements (one small gather + one tiny device-to-host
  copy for all tensors together), which catches writes that bypass the version counter
  (``tensor.data.add_()``, numpy or DLPack aliases) in any tensor updated as a whole.

A write that bypasses the version counter *and* leaves all 64 sampled elements
unchanged would go unseen; that is why incremental saves are opt-in.
"""

from __future__ import annotations

import logging
import mmap
import threading
import weakref
from dataclasses import dataclass

import torch
import xxhash

log = logging.getLogger("trainguard")

_ALIGN = 64
_SAMPLES = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class HostArena:
    """Reusable host staging memory for snapshots (one save at a time uses it)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._offset = 0
        self._streams: dict[torch.device, object] = {}
        self._waited: set[torch.device] = set()  # streams already ordered after training
        self.pinned = False
        self._registered: list[int] = []  # addresses registered with cudaHostRegister
        weakref.finalize(self, _unregister, self._registered)
        self._reserving: threading.Thread | None = None
        self._reserved: tuple | None = None  # (buffer, pinned, registered) from reserve()

    @property
    def capacity(self) -> int:
        """Bytes currently allocated."""
        return 0 if self._buffer is None else self._buffer.numel()

    def reserve(self, total_bytes: int, pin: bool) -> None:
        """Allocate the buffer in a background thread, so that the first save finds it
        ready: pinning 19.3 GB took ~9-12 s on an H100 host, and faulting in 1 GB of
        fresh CPU pages ~0.3 s, both otherwise spent inside the first save's stall.
        :meth:`reset` waits for it (a save started too early waits the rest)."""
        self._adopt_reserved()
        pin = pin and torch.cuda.is_available()
        if self.capacity >= total_bytes and (self.pinned or not pin):
            return
        device = torch.cuda.current_device() if pin else None

        def allocate() -> None:
            try:
                if device is not None:  # a new thread starts on GPU 0: register from ours
                    torch.cuda.set_device(device)
                registered: list[int] = []
                buffer = _pinned(total_bytes, registered) if pin else None
                if buffer is None:
                    buffer = torch.empty(total_bytes, dtype=torch.uint8)
                    buffer.fill_(0)  # fault the pages in now, not during the snapshot
                self._reserved = (buffer, pin, registered)
            except Exception as exc:  # the save allocates instead
                log.warning("could not reserve %d bytes of host memory for checkpoints "
                            "ahead of time (%r); the first save allocates them", total_bytes,
                            exc)

        self._reserving = threading.Thread(target=allocate, name="trainguard-arena",
                                           daemon=True)
        self._reserving.start()

    def _adopt_reserved(self) -> None:
        """Wait for :meth:`reserve`'s thread, then make its buffer the arena's."""
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None
        if self._reserved is not None:
            buffer, pinned, registered = self._reserved
            self._reserved = None
            self.release()
            self._buffer, self.pinned = buffer, pinned
            self._registered.extend(registered)

    def reset(self, total_bytes: int, pin: bool) -> None:
        """Prepare for a snapshot of ``total_bytes`` (plus alignment); grows if needed."""
        self._adopt_reserved()
        self._waited.clear()  # a failed earlier snapshot may have left streams marked
        if self._buffer is None or self._buffer.numel() < total_bytes or (pin and not self.pinned):
            self.release()  # free the old one before allocating its successor
            pin = pin and torch.cuda.is_available()
            self._buffer = _pinned(total_bytes, self._registered) if pin else None
            if self._buffer is None:
                self._buffer = torch.empty(total_bytes, dtype=torch.uint8)
            self.pinned = pin
        self._offset = 0

    def release(self) -> None:
        """Drop the buffer (unpinning it first); the next save allocates anew."""
        if self._reserving is not None:  # never leave a reservation behind
            self._adopt_reserved()
        _unregister(self._registered)
        self._buffer = None
        self.pinned = False

    @staticmethod
    def bytes_needed(tensors: list[torch.Tensor]) -> int:
        """Arena bytes for ``tensors`` including per-tensor alignment."""
        return sum(_aligned(t.numel() * t.element_size()) for t in tensors)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` into the arena and return the (contiguous, CPU) copy.

        CUDA copies are only queued here; call :meth:`synchronize` before using them.
        """
        nbytes = tensor.numel() * tensor.element_size()
        assert self._buffer is not None and self._offset + nbytes <= self._buffer.numel()
        raw = self._buffer[self._offset:self._offset + nbytes]
        self._offset += _aligned(nbytes)
        dst = raw.view(tensor.dtype).view(tensor.shape) if nbytes else \
            torch.empty(tensor.shape, dtype=tensor.dtype)
        if nbytes == 0:
            return dst
        if tensor.device.type == "cuda":
            stream = self._cuda_stream(tensor.device)
            with torch.cuda.stream(stream):
                dst.copy_(tensor, non_blocking=True)
        else:
            dst.copy_(tensor)
        return dst

    def _cuda_stream(self, device: torch.device):
        """The copy stream of ``device``; it first waits for everything already queued
        on the training stream, so the copies see the values as of the ``save`` call."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        if device not in self._waited:
            stream.wait_stream(torch.cuda.current_stream(device))
            self._waited.add(device)
        return stream

    def synchronize(self) -> None:
        """Wait for queued device-to-host copies; after this the snapshot is consistent."""
        for device in self._waited:
            self._streams[device].synchronize()
        self._waited.clear()  # the next shard or save orders itself after training again


def _pinned(nbytes: int, registered: list[int]) -> torch.Tensor | None:
    """``nbytes`` of page-locked host memory, exactly: an anonymous mapping registered
    with CUDA. Its address goes into ``registered`` (for :func:`_unregister`). None when
    registration fails (then the caller falls back to torch's pinned allocator)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes)
    buffer = torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps region alive
    rc = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
    if int(getattr(rc, "value", rc)) != 0:
        log.warning("cudaHostRegister of %d bytes failed (%s); using torch's pinned "
                    "allocator (rounds up to a power of two)", nbytes, rc)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    registered.append(buffer.data_ptr())
    return buffer


def _unregister(registered: list[int]) -> None:
    """Unpin what :func:`_pinned` pinned. Safe while copies of the arena are still in
    use: unpinning never frees the memory, the mapping lives as long as its tensors."""
    while registered:
        torch.cuda.cudart().cudaHostUnregister(registered.pop())


def _identity(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype, str(tensor.device), tensor._version)


def fingerprints(tensors: list[torch.Tensor]) -> list[str]:
    """A hash of 64 evenly spaced elements of each tensor, with one device-to-host copy
    per device."""
    samples = []
    for tensor in tensors:
        flat = tensor.reshape(-1)
        n = flat.numel()
        if n == 0:
            samples.append(torch.empty(0, dtype=torch.uint8, device=tensor.device))
            continue
        k = min(n, _SAMPLES)
        # Integer arithmetic: float32 linspace rounds the last index up to n past 2**24.
        idx = torch.arange(k, device=tensor.device, dtype=torch.int64) * (n - 1) // max(1, k - 1)
        samples.append(flat[idx].contiguous().view(-1).view(torch.uint8))
    by_device: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_device.setdefault(str(sample.device), []).append(i)
    host: list[bytes] = [b""] * len(samples)
    for indices in by_device.values():
        joined = torch.cat([samples[i] for i in indices]).cpu().numpy().tobytes()
        pos = 0
        for i in indices:
            size = samples[i].numel()
            host[i] = joined[pos:pos + size]
            pos += size
    return [xxhash.xxh3_64(b).hexdigest() for b in host]


@dataclass(frozen=True)
class Location:
    """Where a tensor's bytes live on the store: a checkpoint, a file, a name in it."""

    step: int
    file: str
    name: str


@dataclass(frozen=True)
class _Seen:
    identity: tuple
    fingerprint: str
    location: Location
    storage: weakref.ref  # the very storage object: a new one at a reused address differs


class ChangeTracker:
    """Remembers each tensor as it was at the last committed save (see module docs)."""

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    def split(self, tensors: dict[str, torch.Tensor],
              fresh: frozenset[str] = frozenset()) -> tuple[dict, dict, dict]:
        """Split into (changed tensors, unchanged name -> Location, name -> observation).

        Args:
            tensors: the state's tensors by name.
            fresh: names of tensors built anew for this save (numpy arrays copied into a
                tensor, say): they carry no history, so they always count as changed.

        The third item is what :meth:`commit` records once the save has committed.
        """
        names = list(tensors)
        prints = fingerprints([tensors[n] for n in names])
        changed, unchanged, observed = {}, {}, {}
        for name, fingerprint in zip(names, prints, strict=True):
            tensor = tensors[name]
            identity = _identity(tensor)
            storage = tensor.untyped_storage()
            observed[name] = (identity, fingerprint, weakref.ref(storage))
            seen = self._seen.get(name)
            if (name not in fresh and seen is not None and seen.storage() is storage
                    and seen.identity == identity and seen.fingerprint == fingerprint):
                unchanged[name] = seen.location
            else:
                changed[name] = tensor
        return changed, unchanged, observed

    def commit(self, observed: dict, locations: dict[str, Location]) -> None:
        """Record the committed save: every tensor's identity and where its bytes are."""
        self._seen = {name: _Seen(identity, fingerprint, locations[name], storage)
                      for name, (identity, fingerprint, storage) in observed.items()}

    def forget(self) -> None:
        """Drop what is known (after a failed save or a restore): the next save is full."""
        self._seen = {}
