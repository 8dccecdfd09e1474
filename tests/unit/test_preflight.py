"""Preflight catches doomed runs before they start: imports, credentials, versions, store."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from trainguard.cli import cli
from trainguard.preflight import (
    PreflightFailed,
    PreflightTarget,
    check_disk,
    check_gpu,
    check_modal_credentials,
    check_store,
    check_versions,
    import_closure,
    require_ok,
    run_preflight,
)
from trainguard.store import LocalStore

FIXTURE = Path(__file__).parent.parent / "fixtures" / "modal_project"


def test_a_missing_local_module_is_named_with_file_and_line(tmp_path):
    closure = import_closure(FIXTURE / "broken.py")
    assert [(s.module, Path(s.file).name, s.line) for s in closure.missing] == [
        ("mypkg.nothere", "broken.py", 3)]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .gone import thing\n")
    (tmp_path / "main.py").write_text("import os\n\nimport pkg\n")
    result = run_preflight(tmp_path / "main.py", PreflightTarget("local"))[0]
    assert not result.ok and "pkg.gone" in result.detail
    assert f"{tmp_path / 'pkg' / '__init__.py'}:1" in result.detail


def test_relative_and_optional_imports_resolve(tmp_path):
    closure = import_closure(FIXTURE / "train.py")
    assert not closure.missing
    names = {Path(f).relative_to(FIXTURE).as_posix() for f in closure.files}
    assert {"mypkg/models/net.py", "mypkg/models/layers.py", "mypkg/data/loader.py"} <= names
    assert closure.third_party["wandb"].optional  # inside try/except ImportError


def test_a_third_party_module_absent_from_the_modal_image_is_caught():
    target = PreflightTarget("modal", packages=("torch==2.2.2",), env={"MODAL_TOKEN_ID": "a",
                                                                      "MODAL_TOKEN_SECRET": "b"})
    results = {r.name: r for r in run_preflight(FIXTURE / "train.py", target)}
    assert not results["imports"].ok and "numpy" in results["imports"].detail
    assert "train.py:6" in results["imports"].detail
    ok = PreflightTarget("modal", packages=("numpy==1.26.4",), env=target.env)
    assert {r.name: r.ok for r in run_preflight(FIXTURE / "train.py", ok)}["imports"]


def test_missing_credentials_are_reported_without_network(tmp_path):
    result = check_modal_credentials(env={}, home=tmp_path)
    assert not result.ok
    assert "modal token new" in result.fix and "MODAL_TOKEN_ID" in result.fix
    half = check_modal_credentials(env={"MODAL_TOKEN_ID": "ak-1"}, home=tmp_path)
    assert not half.ok and "only MODAL_TOKEN_ID" in half.detail
    assert check_modal_credentials(env={"MODAL_TOKEN_ID": "a", "MODAL_TOKEN_SECRET": "b"},
                                   home=tmp_path).ok
    (tmp_path / ".modal.toml").write_text('[me]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\n'
                                          'active = true\n')
    assert check_modal_credentials(env={}, home=tmp_path).ok
    (tmp_path / ".modal.toml").write_text('[me]\nactive = true\n')
    assert not check_modal_credentials(env={}, home=tmp_path).ok


def test_unmet_version_pins_fail_here_and_in_the_image():
    versions = {"torch": "2.4.0", "numpy": "1.26.4"}
    bad = check_versions(["torch==2.2.2"], versions.get, "this machine")
    assert not bad.ok and "torch 2.4.0" in bad.detail and "torch==2.2.2" in bad.detail
    assert check_versions(["numpy<2", "torch>=2"], versions.get, "this machine").ok
    assert not check_versions(["scipy"], versions.get, "this machine").ok
    image = PreflightTarget("modal", packages=("numpy==2.1.0", "torch"))
    results = {r.name: r for r in run_preflight(FIXTURE / "train.py", image,
                                                requires=["numpy<2"])}
    assert not results["versions"].ok and "numpy 2.1.0" in results["versions"].detail
    unpinned = run_preflight(FIXTURE / "train.py", image, requires=["torch==2.2.2"])[-1]
    assert not unpinned.ok and "not pinned" in unpinned.detail
    with pytest.raises(ValueError, match="cannot read requirement"):
        run_preflight(FIXTURE / "train.py", image, requires=["torch=>>2"])


def test_store_disk_and_gpu_checks(tmp_path):
    assert check_store(LocalStore(tmp_path / "run")).ok
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert not check_store(LocalStore(blocked / "run")).ok
    usage = lambda path: type("U", (), {"free": 3 << 30})()  # noqa: E731
    assert check_disk(tmp_path, 1 << 30, usage=usage).ok
    low = check_disk(tmp_path, 2 << 30, usage=usage)
    assert not low.ok and "2 checkpoints" in low.detail
    assert not check_gpu(1, device_count=lambda: 0).ok and check_gpu(2, lambda: 2).ok
    with pytest.raises(PreflightFailed, match="fix:"):
        require_ok([low])


def test_preflight_command_prints_checks_and_exits_6(tmp_path, monkeypatch):
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "absent.toml"))
    result = CliRunner().invoke(cli, ["preflight", str(FIXTURE / "broken.py"), "--backend",
                                      "modal", "--require", "numpy==1.0"])
    assert result.exit_code == 6
    assert "✗ modal credentials" in result.output and "modal token new" in result.output
    assert "broken.py:3" in result.output and "✓ modal installed" in result.output
    assert "Traceback" not in result.output
    monkeypatch.chdir(tmp_path)
    good = CliRunner().invoke(cli, ["preflight", str(FIXTURE / "train.py"), "--run-dir",
                                    str(tmp_path / "run"), "--checkpoint-size", "1M"])
    assert good.exit_code == 0, good.output
    assert "✓ store writable" in good.output and "✓ disk space" in good.output


def test_local_run_is_refused_when_an_import_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["run", str(FIXTURE / "broken.py"), "--retries", "0"])
    assert result.exit_code == 6 and "mypkg.nothere" in result.output
    assert not (tmp_path / "home" / "jobs").exists() or not any((tmp_path / "home" / "jobs").iterdir())


def test_preflight_gates_the_data_with_its_counts(tmp_path):
    from click.testing import CliRunner

    from trainguard.cli import cli

    script = tmp_path / "train.py"
    script.write_text("import os\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.json").write_text("[0, 0]")
    args = ["preflight", str(script), "--run-dir", str(tmp_path / "run"), "--data", str(cache),
            "--data-stats", "tests.unit.test_data:count_positive", "--data-pattern", "*.json"]
    failed = CliRunner().invoke(cli, [*args, "--data-require", "positive > 0"])
    assert failed.exit_code == 6, failed.output
    assert "✗ data" in failed.output and "positive > 0 (it is 0)" in failed.output
    ok = CliRunner().invoke(cli, [*args, "--data-require", "windows >= 2"])
    assert ok.exit_code == 0 and "✓ data" in ok.output and "windows=2" in ok.output
