"""The public surface is explicit: a change to it is a decision, not an accident."""

import ast
import importlib

import pytest

import trainguard

EXPECTED = [
    "CheckpointCorrupt", "CheckpointError", "CheckpointExists", "CheckpointInfo",
    "CheckpointManager", "CheckpointNotFound", "DataCheckFailed", "DataGate", "DataGateFailed",
    "EXIT_RESUME", "HeartbeatRecord", "LocalStore", "LockHeld", "NonFiniteLoss", "ObjectStore",
    "Preempted", "RNGState", "ResumableLoader", "ResumableSampler", "RetentionPolicy", "Run",
    "RunConfig", "RunDirError", "SaveHandle", "StateMismatch", "Store", "StoreError",
    "TrainguardError", "__version__", "expect_all", "expect_any", "expect_mean", "keep_any",
    "keep_best", "keep_every", "keep_last", "keep_newer_than", "open_store", "read_heartbeat",
]


def test_exported_names_are_pinned_and_sorted():
    assert trainguard.__all__ == sorted(trainguard.__all__)
    assert trainguard.__all__ == sorted(EXPECTED)
    assert all(hasattr(trainguard, name) for name in trainguard.__all__)


def test_every_error_derives_from_the_root_and_has_an_exit_code():
    errors = [getattr(trainguard, n) for n in trainguard.__all__
              if isinstance(getattr(trainguard, n), type)
              and issubclass(getattr(trainguard, n), trainguard.TrainguardError)]
    assert len(errors) >= 10
    assert all(isinstance(e.exit_code, int) and e.exit_code > 0 for e in errors)


LAZY_PACKAGES = ["trainguard", "trainguard.checkpoint", "trainguard.launch", "trainguard.run"]


def _type_checking_imports(package) -> dict[str, str]:
    """name -> module, from the package's ``if TYPE_CHECKING:`` imports."""
    tree = ast.parse(open(package.__file__).read())
    block = next(node for node in tree.body if isinstance(node, ast.If)
                 and getattr(node.test, "id", None) == "TYPE_CHECKING")
    return {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
            for alias in node.names}


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_lazy_names_resolve_to_what_the_type_checking_imports_say(name):
    package = importlib.import_module(name)
    declared = _type_checking_imports(package)
    assert sorted(declared) == sorted(n for n in package.__all__ if n != "__version__")
    for attr, module in declared.items():
        assert getattr(package, attr) is getattr(importlib.import_module(module), attr), attr
    assert set(package.__all__) <= set(dir(package))
    assert not hasattr(package, "no_such_name")
    with pytest.raises(AttributeError, match=f"module '{name}' has no attribute 'Nope'"):
        package.Nope  # noqa: B018


def test_the_old_data_module_still_exports_the_dataset_manifests():
    # trainguard.data was renamed trainguard.data_manifest; scripts importing the old
    # path (from trainguard.data import DataGate) keep working.
    import trainguard.data
    import trainguard.data_manifest

    assert trainguard.data.__all__
    for name in trainguard.data.__all__:
        assert getattr(trainguard.data, name) is getattr(trainguard.data_manifest, name), name
