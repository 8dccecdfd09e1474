"""Public names that load on first use (PEP 562), so importing a package stays cheap.

``import trainguard`` and the CLI's job commands need no torch, while ``trainguard.Run``
does. A package lists which module defines each of its public names; the first lookup
of a name (``trainguard.Run``, ``from trainguard import Run``) imports that module and
stores the value in the package's namespace, so every later lookup is a plain attribute
read and ``__getattr__`` is not called again for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, namespace: dict, exports: Mapping[str, tuple[str, ...]]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package with lazy names.

    Args:
        package: the package's ``__name__`` (for error messages).
        namespace: the package's ``globals()``; loaded names are stored in it.
        exports: defining module -> the names it provides, e.g.
            ``{"trainguard.run.run": ("Run",)}``.

    Returns:
        ``(__getattr__, __dir__)``, to assign at the package's top level.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
