"""Storage backends: where checkpoint bytes live and when they count (see ``base``)."""

from __future__ import annotations

import os

from trainguard.store.base import Store, check_key
from trainguard.store.local import LocalStore
from trainguard.store.modal_volume import ModalVolumeReader, ModalVolumeStore, store_for_path
from trainguard.store.object import SCHEMES, ObjectStore

__all__ = ["LocalStore", "ModalVolumeReader", "ModalVolumeStore", "ObjectStore", "Store",
           "check_key", "open_store"]


def open_store(target: str | os.PathLike | Store) -> Store:
    """Return a :class:`Store` for a path, a URL, or an existing store.

    Args:
        target: a directory path, ``file:///abs/path``, ``s3://bucket/prefix`` (also
            ``gs://``, ``az://``...), ``modal://VOLUME/PATH`` (read through the Volume
            API), or an object implementing :class:`Store` (returned
            as is).

    Raises:
        ValueError: the URL scheme has no backend in this installation.
    """
    if isinstance(target, Store) and not isinstance(target, (str, os.PathLike)):
        return target
    text = os.fspath(target)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme == "file":
            return LocalStore(rest)
        if scheme in SCHEMES:
            return ObjectStore(text)
        if scheme == "modal":
            return ModalVolumeReader(text)
        raise ValueError(
            f"no storage backend for {scheme}:// URLs; use a directory path or one of "
            + ", ".join(f"{s}://" for s in ("file", *SCHEMES, "modal"))
        )
    # inside a Modal container, a path on a mounted volume commits through the volume
    return store_for_path(text) or LocalStore(text)
