"""The import closure of an entrypoint, found by static analysis (``ast``, nothing runs).

Starting from the training script, every ``import`` / ``from ... import`` is resolved the
way ``python SCRIPT`` would resolve it with the project root on ``PYTHONPATH``:

* a name in the standard library is skipped;
* a name found as ``NAME.py`` or ``NAME/`` in the script's directory or the project root,
  or in a ``src/`` directory beside either (the "src layout": ``src/mypkg``), is a
  **local** module: it is shipped with the job and analysed in turn (transitively,
  relative imports included);
* anything else is a **third-party** module, which must be installed in the target
  environment (locally: importable; on Modal: in the image's packages).

Directories that hold installed packages (``site-packages``, virtual environments) are
never treated as local, so nothing installed is ever shipped as source. Imports inside
``try: ... except ImportError`` are optional: they are resolved when possible but never
reported missing.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: Directory names never searched for local modules (installed code, caches, VCS).
SKIP_DIRS = frozenset({"site-packages", "dist-packages", ".venv", "venv", "env", ".git",
                       "__pycache__", "node_modules", ".tox", ".nox", "build", "dist"})
_OPTIONAL_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass(frozen=True)
class ImportSite:
    """Where an import statement is: ``file:line`` and the module it names."""

    module: str
    file: str
    line: int
    optional: bool = False

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class ImportClosure:
    """What an entrypoint needs.

    Attributes:
        script: the entrypoint (absolute path).
        root: the project root (absolute path).
        local: top-level local module name -> its path (a ``.py`` file or a package dir).
        files: every local source file analysed (the script included), sorted.
        third_party: top-level third-party module name -> the first place importing it.
        missing: local imports that resolve to nothing (a submodule or relative module
            whose file does not exist), with the importing file and line.
    """

    script: str
    root: str
    local: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    third_party: dict[str, ImportSite] = field(default_factory=dict)
    missing: list[ImportSite] = field(default_factory=list)


def _is_installed_dir(path: Path) -> bool:
    return any(part in SKIP_DIRS for part in path.parts) or (path / "pyvenv.cfg").exists()


def _find_in(directory: Path, dotted: str) -> Path | None:
    """The file or package dir of ``dotted`` under ``directory`` (None when absent)."""
    base = directory.joinpath(*dotted.split("."))
    if base.is_dir() and not _is_installed_dir(base) and (
            (base / "__init__.py").is_file() or any(base.glob("*.py"))):
        return base  # a directory without Python files (data/) is not a package
    as_file = base.with_suffix(".py")
    return as_file if as_file.is_file() else None


def _source_of(target: Path) -> Path | None:
    """The source file to analyse for a module path (``__init__.py`` for packages)."""
    if target.is_dir():
        init = target / "__init__.py"
        return init if init.is_file() else None  # a namespace package has no code
    return target


def _optional_lines(tree: ast.AST) -> set[int]:
    """Line numbers of statements inside ``try`` blocks that catch ImportError."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names = set()
        for handler in node.handlers:
            kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            names |= {k.id if isinstance(k, ast.Name) else getattr(k, "attr", "")
                      for k in kinds if k is not None} if handler.type else {"BaseException"}
        if names & _OPTIONAL_ERRORS:
            for stmt in node.body:
                lines |= {n.lineno for n in ast.walk(stmt) if hasattr(n, "lineno")}
    return lines


class _Analyzer:
    """Walks the import graph from the script; see :func:`import_closure`."""

    def __init__(self, script: Path, root: Path) -> None:
        bases = [script.parent] if script.parent == root else [script.parent, root]
        self.search = bases + [b / "src" for b in bases
                               if (b / "src").is_dir() and not _is_installed_dir(b / "src")]
        self.result = ImportClosure(str(script), str(root))
        self.seen: set[Path] = set()
        self.stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)

    def find_local(self, dotted: str) -> Path | None:
        for directory in self.search:
            found = _find_in(directory, dotted)
            if found is not None:
                return found
        return None

    def visit_file(self, path: Path, package: str) -> None:
        """Analyse one source file; ``package`` is its package (for relative imports)."""
        path = path.resolve()
        if path in self.seen:
            return
        self.seen.add(path)
        self.result.files.append(str(path))
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as exc:
            self.result.missing.append(ImportSite(f"<syntax error: {exc}>", str(path),
                                                  getattr(exc, "lineno", 0) or 0))
            return
        optional = _optional_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.resolve(alias.name, (), path, node.lineno, node.lineno in optional)
            elif isinstance(node, ast.ImportFrom):
                base = self.absolute(node, package, path)
                if base is not None:
                    names = tuple(a.name for a in node.names if a.name != "*")
                    self.resolve(base, names, path, node.lineno, node.lineno in optional,
                                 relative=node.level > 0)

    def absolute(self, node: ast.ImportFrom, package: str, path: Path) -> str | None:
        """The absolute module name of a ``from`` import (None: cannot be resolved)."""
        if node.level == 0:
            return node.module
        parts = package.split(".") if package else []
        if node.level - 1 > len(parts) or not package:
            self.result.missing.append(ImportSite("." * node.level + (node.module or ""),
                                                  str(path), node.lineno))
            return None
        base = parts[:len(parts) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def resolve(self, dotted: str, names: tuple[str, ...], path: Path, line: int,
                optional: bool, relative: bool = False) -> None:
        """Record where ``dotted`` (and ``from dotted import names``) comes from."""
        top = dotted.split(".")[0]
        if not relative and top in self.stdlib:
            return
        top_path = self.find_local(top)
        if top_path is None:
            if not relative:
                self.result.third_party.setdefault(top, ImportSite(top, str(path), line, optional))
            return
        self.result.local.setdefault(top, str(top_path))
        target = self.find_local(dotted)
        if target is None:
            if not optional:
                self.result.missing.append(ImportSite(dotted, str(path), line))
            return
        self.visit_module(dotted, target)
        for name in names:  # `from pkg import sub` may name a submodule
            sub = self.find_local(f"{dotted}.{name}")
            if sub is not None:
                self.visit_module(f"{dotted}.{name}", sub)

    def visit_module(self, dotted: str, target: Path) -> None:
        parts = dotted.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            parent = self.find_local(".".join(parts[:i]))
            source = _source_of(parent) if parent is not None else None
            if source is not None:
                self.visit_file(source, ".".join(parts[:i]))
        source = _source_of(target)
        if source is not None:
            self.visit_file(source, dotted if target.is_dir() else ".".join(parts[:-1]))


def import_closure(script: str | os.PathLike, root: str | os.PathLike | None = None
                   ) -> ImportClosure:
    """Statically resolve every import of ``script``, transitively, inside ``root``.

    Args:
        script: the entrypoint.
        root: the project root (default: the script's directory).

    Returns:
        The closure: local modules (to ship), third-party modules (to install), and
        missing local modules with the file and line importing them.

    Raises:
        FileNotFoundError: the script does not exist.
    """
    script_path = Path(script).resolve()
    if not script_path.is_file():
        raise FileNotFoundError(f"script {script} does not exist")
    root_path = Path(root).resolve() if root else script_path.parent
    analyzer = _Analyzer(script_path, root_path)
    analyzer.visit_file(script_path, "")
    result = analyzer.result
    result.files.sort()
    result.local = dict(sorted(result.local.items()))
    result.third_party = dict(sorted(result.third_party.items()))
    return result
