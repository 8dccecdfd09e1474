"""Data manifests and the gate: no run starts on empty or stale data."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from trainguard.cli import cli
from trainguard.data_manifest import (
    FORCE_ENV,
    DataGate,
    DataManifest,
    build,
    check_requirements,
    validate,
)
from trainguard.errors import DataGateFailed


def count_positive(path) -> dict:
    """Per-shard statistics: each shard is a JSON list of 0/1 labels."""
    labels = json.loads(path.read_text())
    return {"windows": len(labels), "positive": sum(labels)}


def _cache(tmp_path, shards) -> str:
    root = tmp_path / "cache"
    root.mkdir(exist_ok=True)
    for i, labels in enumerate(shards):
        (root / f"shard-{i}.json").write_text(json.dumps(labels))
    return str(root)


def test_build_records_files_and_totals(tmp_path):
    root = _cache(tmp_path, [[0, 1, 1], [0, 0]])
    manifest = build(root, stats=count_positive, pattern="*.json")
    assert [f.path for f in manifest.files] == ["shard-0.json", "shard-1.json"]
    totals = manifest.totals
    assert (totals["files"], totals["windows"], totals["positive"]) == (2, 5, 2)
    assert DataManifest.load(root).totals == totals
    assert validate(manifest, root) == []


def test_validate_names_missing_changed_new_and_empty_files(tmp_path):
    root = _cache(tmp_path, [[1], [0, 1], [1, 1]])
    manifest = build(root, pattern="*.json")
    os.remove(os.path.join(root, "shard-0.json"))
    with open(os.path.join(root, "shard-1.json"), "a") as handle:
        handle.write(" ")
    open(os.path.join(root, "shard-2.json"), "w").close()
    open(os.path.join(root, "shard-9.json"), "w").write("[1]")
    problems = validate(manifest, root)
    assert problems == ["missing: shard-0.json", "new file not in the manifest: shard-9.json",
                        "changed: shard-1.json", "empty: shard-2.json"]


def test_gate_refuses_zero_positives_naming_the_counts(tmp_path):
    root = _cache(tmp_path, [[0, 0, 0], [0]])
    gate = DataGate(root, stats=count_positive, require=["positive > 0"], pattern="*.json")
    with pytest.raises(DataGateFailed, match=r"positive > 0 \(it is 0\).*windows=4"):
        gate.check(log=lambda msg: None)


def test_gate_rebuilds_a_stale_manifest_and_forced_rebuild(tmp_path, monkeypatch):
    root = _cache(tmp_path, [[0]])
    build(root, stats=count_positive, pattern="*.json")
    (tmp_path / "cache" / "shard-1.json").write_text("[1, 1]")  # the cache grew
    messages = []
    gate = DataGate(root, stats=count_positive, require=["positive >= 2"], pattern="*.json")
    assert gate.check(log=messages.append).totals["positive"] == 2
    assert "rebuilding" in messages[0] and "shard-1.json" in messages[0]
    messages.clear()
    gate.check(log=messages.append)
    assert messages == []  # fresh now: no rebuild
    monkeypatch.setenv(FORCE_ENV, "1")
    gate.check(log=messages.append)
    assert FORCE_ENV in messages[0]


def test_gate_without_rebuild_fails_on_stale_and_on_missing_dir(tmp_path):
    root = _cache(tmp_path, [[1]])
    build(root, pattern="*.json")
    (tmp_path / "cache" / "shard-0.json").write_text("[1, 1, 1]")
    with pytest.raises(DataGateFailed, match="stale: changed: shard-0.json"):
        DataGate(root, pattern="*.json", rebuild_when_stale=False).check()
    with pytest.raises(DataGateFailed, match="does not exist"):
        DataGate(str(tmp_path / "nope")).check()


@pytest.mark.parametrize("bad", ["positive", "positive >> 1", "1 < positive"])
def test_bad_requirements_are_refused(bad):
    with pytest.raises(ValueError, match="must look like"):
        check_requirements({"positive": 1}, [bad])


def test_cli_build_check_scan(tmp_path):
    root = _cache(tmp_path, [[0, 0], [0]])
    runner = CliRunner()
    spec = "tests.unit.test_data_manifest:count_positive"
    built = runner.invoke(cli, ["data", "build", root, "--pattern", "*.json", "--stats", spec])
    assert built.exit_code == 0, built.output
    assert "windows 3" in " ".join(built.output.split())
    failed = runner.invoke(cli, ["data", "check", root, "--require", "positive > 0"])
    assert failed.exit_code == 4 and "positive > 0 (it is 0)" in failed.output
    assert runner.invoke(cli, ["data", "check", root, "--require", "windows == 3"]).exit_code == 0
    (tmp_path / "cache" / "shard-1.json").write_text("[1, 1, 1]")
    stale = runner.invoke(cli, ["data", "check", root])
    assert stale.exit_code == 4 and "changed: shard-1.json" in stale.output
    scanned = runner.invoke(cli, ["data", "scan", root])
    assert scanned.exit_code == 0 and "1 change(s)" in scanned.output
    assert "positive 3" in " ".join(scanned.output.split())
    bad = runner.invoke(cli, ["data", "check", root, "--require", "positive"])
    assert bad.exit_code == 2 and "must look like" in bad.output
    missing = runner.invoke(cli, ["data", "check", str(tmp_path / "none")])
    assert missing.exit_code == 4 and "no data manifest" in missing.output


def test_a_directory_built_empty_is_named_empty_not_stale(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    runner = CliRunner()
    assert runner.invoke(cli, ["data", "build", str(root)]).exit_code == 0
    checked = runner.invoke(cli, ["data", "check", str(root)])
    assert checked.exit_code == 4
    assert f"{root} has no data files" in checked.output and "stale" not in checked.output
    with pytest.raises(DataGateFailed, match="has no data files"):
        DataGate(str(root)).check(log=lambda msg: None)
