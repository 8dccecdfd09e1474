"""Reading untrusted JSON from a checkpoint: bounded parsing and typed fields.

Every byte of a run directory is input from outside the process: a manifest, a state file
or a safetensors header may have been written by another program, damaged, or crafted.
Readers parse them only through this module, so that whatever they hold ends in one of two
ways: a value of exactly the expected type and range, or :class:`CheckpointCorrupt` naming
the file and the field. Never ``RecursionError`` (a nesting bomb), ``OverflowError``
(``1e999`` where an int belongs), ``KeyError`` or ``TypeError``; never a hang: sizes are
bounded before a file is parsed, and depth right after.

Bounds (documented in docs/storage.md):

* :data:`MAX_MANIFEST_BYTES` for a manifest, :data:`MAX_STATE_BYTES` for a state file,
  :data:`MAX_HEADER_BYTES` for a safetensors header (the format's own limit);
* :data:`MAX_DEPTH` levels of JSON nesting. A save refuses a state nested deeper, so
  nothing a save writes is refused on reading.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from trainguard.errors import CheckpointCorrupt

MAX_MANIFEST_BYTES = 16 << 20
MAX_STATE_BYTES = 256 << 20
MAX_HEADER_BYTES = 100 << 20
MAX_DEPTH = 100
MAX_INT = (1 << 63) - 1


def describe(value: Any) -> str:
    """A short description of a value for an error message (never a huge repr)."""
    if isinstance(value, (dict, list)):
        return f"a {'JSON object' if isinstance(value, dict) else 'list'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_json(raw: bytes | memoryview, where: str, what: str, max_bytes: int) -> Any:
    """Parse untrusted JSON: bounded in size before parsing and in depth after.

    ``NaN`` and ``Infinity`` parse (a metric may be NaN); fields that must be finite
    say so in their own check.

    Raises:
        CheckpointCorrupt: bigger than ``max_bytes``, not JSON, or nested deeper than
            :data:`MAX_DEPTH`.
    """
    if len(raw) > max_bytes:
        raise CheckpointCorrupt(f"{where}: {what} of {len(raw)} bytes is over the limit of "
                                f"{max_bytes} bytes; not parsed")
    try:
        doc = json.loads(bytes(raw))
    except RecursionError:  # the C parser recurses per level; it stops cleanly
        raise CheckpointCorrupt(f"{where}: {what} is nested deeper than Python can parse") \
            from None
    except ValueError as exc:  # also bad UTF-8 and ints of more than 4300 digits
        raise CheckpointCorrupt(f"{where}: {what} is not valid JSON "
                                f"({str(exc)[:120]})") from None
    check_depth(doc, where, what)
    return doc


def check_depth(doc: Any, where: str, what: str, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` (walked without recursion).

    Raises:
        CheckpointCorrupt: a value sits deeper than ``limit`` levels.
    """
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            raise CheckpointCorrupt(f"{where}: {what} is nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))


class Fields:
    """Typed access to the fields of one JSON object; any surprise is CheckpointCorrupt.

    Args:
        doc: the parsed JSON value that should be an object.
        where: the file, for messages.
        path: where in the file the object sits (``files["x"]``), for messages.
    """

    def __init__(self, doc: Any, where: str, path: str = "") -> None:
        self.where, self.path = where, path
        if not isinstance(doc, dict):
            raise self.bad(path or "the document", "must be a JSON object", doc)
        self.doc = doc

    def bad(self, field: str, rule: str, value: Any) -> CheckpointCorrupt:
        """The error for ``field`` breaking ``rule``."""
        return CheckpointCorrupt(f"{self.where}: malformed: {field} {rule}, "
                                 f"got {describe(value)}")

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: Any = ...) -> Any:
        """The raw value of ``key`` (``default`` when missing or null; required if none)."""
        value = self.doc.get(key)
        if value is None:
            if default is ...:
                raise CheckpointCorrupt(f"{self.where}: malformed: {self._name(key)} is missing")
            return default
        return value

    def int(self, key: str, lo: int = 0, hi: int = MAX_INT, default: Any = ...) -> int:
        """An int in ``[lo, hi]`` (never a bool, never a float such as ``1e999``)."""
        return as_int(self.get(key, default), self, self._name(key), lo, hi)

    def number(self, key: str, *, finite: bool, lo: float = -math.inf, hi: float = math.inf,
               default: Any = ...) -> float:
        """An int or float (not a bool), finite when asked, within ``[lo, hi]``."""
        value = self.get(key, default)
        rule = f"must be a {'finite ' if finite else ''}number" \
            + (f" in [{lo:g}, {hi:g}]" if math.isfinite(hi) else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(self._name(key), rule, value)
        try:
            number = float(value)
        except OverflowError:  # an int of hundreds of digits
            raise self.bad(self._name(key), rule, value) from None
        if (finite and not math.isfinite(number)) or \
                (math.isfinite(number) and not lo <= number <= hi):
            raise self.bad(self._name(key), rule, value)
        return number

    def str(self, key: str, pattern: re.Pattern | None = None, max_len: int = 4096,
            default: Any = ...) -> str:
        """A string (matching ``pattern`` when given), at most ``max_len`` characters."""
        return as_str(self.get(key, default), self, self._name(key), pattern, max_len)

    def obj(self, key: str, default: Any = ...) -> Fields:
        """The nested object at ``key``."""
        return Fields(self.get(key, default), self.where, self._name(key))

    def list(self, key: str, default: Any = ...) -> list:
        """The list at ``key``."""
        value = self.get(key, default)
        if not isinstance(value, list):
            raise self.bad(self._name(key), "must be a list", value)
        return value


def as_int(value: Any, fields: Fields, name: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` if it is an int in ``[lo, hi]``, else CheckpointCorrupt naming ``name``."""
    if type(value) is not int or not lo <= value <= hi:
        raise fields.bad(name, f"must be an integer in [{lo}, {hi}]", value)
    return value


def as_str(value: Any, fields: Fields, name: str, pattern: re.Pattern | None = None,
           max_len: int = 4096) -> str:
    """``value`` if it is a short enough string matching ``pattern``."""
    if not isinstance(value, str) or len(value) > max_len or \
            (pattern is not None and not pattern.fullmatch(value)):
        rule = "must be a string" + (f" matching {pattern.pattern}" if pattern else "") \
            + (f" of at most {max_len} characters" if max_len < 4096 else "")
        raise fields.bad(name, rule, value)
    return value
