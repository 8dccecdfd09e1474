"""errors.py is the one home of trainguard's exceptions: the tree drawn in its docstring is
the real class tree, and each error has its own exit code, one the CLI really exits with."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pickle
import pkgutil
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import trainguard
from trainguard import errors
from trainguard.cli import cli

SRC = Path(trainguard.__file__).parent
README = SRC.parents[1] / "README.md"

#: Exit codes no error may take: success, click's usage error, EXIT_RESUME (a preempted
#: script), the shell's "cannot execute" / "not found", and 128 + N (killed by signal N).
RESERVED = {0, 2, errors.EXIT_RESUME, 126, 127, *range(128, 256)}

#: Exception classes allowed outside errors.py, as "module.QualName". Only the Modal test
#: double (trainguard.testing.modal_local) may need one: an exception there would model
#: one of Modal's servers, not trainguard's. It defines none today.
ALLOWED_ELSEWHERE: set[str] = set()

#: One line of a drawing: tree prefix, class name, exit code, phrase.
_DRAWN = re.compile(r"^    (?P<tree>(?:[│ ]   |[├└]── )*)(?P<name>[A-Z]\w*) +(?P<code>\d+)  "
                    r"(?P<phrase>\S.*)$")


def drawn() -> dict[str, tuple[str | None, int, str]]:
    """name -> (drawn parent, or None for a root; exit code; phrase), from the docstring."""
    tree: dict[str, tuple[str | None, int, str]] = {}
    path: list[str] = []
    for line in errors.__doc__.splitlines():
        match = _DRAWN.match(line)
        if not match:
            continue
        depth = len(match["tree"]) // 4
        assert depth <= len(path), f"{line!r} is drawn under nothing"
        del path[depth:]
        assert match["name"] not in tree, f"{match['name']} is drawn twice"
        tree[match["name"]] = (path[-1] if path else None, int(match["code"]), match["phrase"])
        path.append(match["name"])
    return tree


def defined_in_errors() -> dict[str, type]:
    return {name: obj for name, obj in vars(errors).items() if inspect.isclass(obj)
            and issubclass(obj, BaseException) and obj.__module__ == errors.__name__}


def test_the_drawn_tree_is_the_class_tree():
    classes, tree = defined_in_errors(), drawn()
    assert sorted(tree) == sorted(classes)
    for name, cls in classes.items():
        parent, code, phrase = tree[name]
        ours = [b.__name__ for b in cls.__bases__ if b.__module__ == errors.__name__]
        assert ours == ([parent] if parent else []), name
        assert code == cls.exit_code, name
        if parent:  # a second, built-in base is said: "(also a ValueError)"
            for other in cls.__bases__[1:]:
                assert f"also a {other.__name__}" in phrase, name
    assert errors.TrainguardError.__bases__ == (Exception,)
    assert errors.Preempted.__bases__ == (SystemExit,)  # not swallowed by `except Exception`


def _modules():
    for info in pkgutil.walk_packages(trainguard.__path__, "trainguard."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing one runs the CLI
            yield importlib.import_module(info.name)


def test_every_exception_class_of_the_package_is_defined_in_errors():
    elsewhere = {f"{obj.__module__}.{obj.__qualname__}" for module in _modules()
                 for obj in vars(module).values()
                 if inspect.isclass(obj) and issubclass(obj, BaseException)
                 and obj.__module__.startswith("trainguard.")
                 and obj.__module__ != errors.__name__}
    assert elsewhere <= ALLOWED_ELSEWHERE


def test_no_exception_class_hides_in_a_function_or_a_class_body():
    """What the import-based test cannot see: classes that are not module attributes."""
    exception_names = {name for name, obj in vars(builtins).items()
                       if inspect.isclass(obj) and issubclass(obj, BaseException)}
    exception_names |= set(defined_in_errors())
    found = []
    for path in SRC.rglob("*.py"):
        if path == Path(errors.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(base, "id", getattr(base, "attr", None)) in exception_names
                    for base in node.bases):
                found.append(f"{path.relative_to(SRC)}: {node.name}")
    assert found == []


def test_errors_imports_nothing():
    """The CLI's fast start imports errors.py: it must not pull in torch or click."""
    tree = ast.parse(Path(errors.__file__).read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all(getattr(node, "module", None) == "__future__" for node in imports)


def test_every_error_has_its_own_exit_code_and_none_is_reserved():
    errors_ = [c for c in defined_in_errors().values() if issubclass(c, errors.TrainguardError)]
    undecided = [c.__name__ for c in errors_ if "exit_code" not in c.__dict__]
    assert undecided == [], "give each error its own exit_code (see errors.py)"
    codes: dict[int, list[str]] = {}
    for cls in errors_:
        codes.setdefault(cls.exit_code, []).append(cls.__name__)
    assert {code: names for code, names in codes.items() if len(names) > 1} == {}
    assert all(isinstance(code, int) and 1 <= code <= 255 for code in codes)
    assert sorted(set(codes) & RESERVED) == []
    assert errors.Preempted.exit_code == errors.EXIT_RESUME == 75
    assert errors.Preempted(7, "SIGTERM").code == errors.EXIT_RESUME


def test_the_readme_table_lists_every_code():
    listed = {name: int(code) for code, name in
              re.findall(r"^\| (\d+) \| `(\w+)`", README.read_text(), re.MULTILINE)}
    assert listed == {name: cls.exit_code for name, cls in defined_in_errors().items()}


@pytest.mark.parametrize("cls", [errors.AttemptPreempted, errors.AttemptFailed])
def test_the_modal_attempt_errors_survive_pickling(cls):
    """Modal pickles the exception a container raised back to the client."""
    back = pickle.loads(pickle.dumps(cls("train.py exited with code 3")))
    assert type(back) is cls and str(back) == "train.py exited with code 3"
    assert isinstance(back, RuntimeError) and isinstance(back, errors.TrainguardError)


def test_the_moved_names_still_import_from_where_they_were():
    from trainguard.launch.backends import BackendUnreachable
    from trainguard.launch.jobs import JobBusy, JobNotFound, JobTableError, RunDirBusy
    from trainguard.launch.modal_backend import ModalConfigError
    from trainguard.launch.modal_jobs import ModalLaunchFailed
    from trainguard.preflight import PreflightFailed
    from trainguard.run.config import EXIT_RESUME
    from trainguard.run.guards import DataCheckFailed, NonFiniteLoss
    from trainguard.run.signals import Preempted

    moved = [BackendUnreachable, JobBusy, JobNotFound, JobTableError, RunDirBusy,
             ModalConfigError, ModalLaunchFailed, PreflightFailed, DataCheckFailed,
             NonFiniteLoss, Preempted]
    assert all(getattr(errors, cls.__name__) is cls for cls in moved)
    assert EXIT_RESUME is errors.EXIT_RESUME
    assert issubclass(ModalConfigError, ValueError)  # `except ValueError` still catches it


@pytest.mark.parametrize("args, error", [
    (["ls", "{tmp}/missing"], errors.RunDirError),
    (["status", "nosuchjob"], errors.JobNotFound),
])
def test_the_cli_exits_with_the_error_class_code(tmp_path, monkeypatch, args, error):
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == error.exit_code, result.output
    assert result.output.startswith("trainguard: error: ") and "Traceback" not in result.output
