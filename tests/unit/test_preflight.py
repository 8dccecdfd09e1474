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
    target = PreflightTarget("modal", packages=("torch==2.2.2",))
    results = {r.name: r for r in run_preflight(FIXTURE / "train.py", target)}
    assert not results["imports"].ok and "numpy" in results["imports"].detail
    assert "train.py:6" in results["imports"].detail
    ok = PreflightTarget("modal", packages=("numpy==1.26.4",))
    assert {r.name: r.ok for r in run_preflight(FIXTURE / "train.py", ok)}["imports"]


def test_the_documented_modal_preflight_passes_the_runtime_the_image_installs(monkeypatch):
    """`trainguard preflight examples/modal_train.py --backend modal` exited 6 with
    "torch, trainguard not installed" although the image installs torch and ships
    trainguard."""
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-1")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-1")
    example = Path(__file__).parents[2] / "examples" / "modal_train.py"
    out = CliRunner().invoke(cli, ["preflight", str(example), "--backend", "modal"])
    assert out.exit_code == 0, out.output
    assert "✓ imports" in out.output


def test_fixes_name_what_pip_installs_and_src_layout_packages_are_local(tmp_path, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-1")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-1")
    (tmp_path / "src" / "mypkg").mkdir(parents=True)
    (tmp_path / "src" / "mypkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "train.py").write_text("import sklearn\nimport yaml\nimport mypkg\n")
    out = CliRunner().invoke(cli, ["preflight", str(tmp_path / "train.py"), "--backend",
                                   "modal"])
    assert out.exit_code == 6
    assert "--pip scikit-learn --pip pyyaml" in out.output  # not --pip sklearn
    assert "mypkg" not in out.output.split("fix:")[0].split("imports:")[1]
    closure = import_closure(tmp_path / "train.py")
    assert closure.local == {"mypkg": str(tmp_path / "src" / "mypkg")}


def test_files_the_script_opens_but_the_launch_does_not_ship_are_warned_about(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-1")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("a,b\n")
    (tmp_path / "tok.json").write_text("{}")
    (tmp_path / "train.py").write_text(
        "import argparse, json\nparser = argparse.ArgumentParser()\n"
        "parser.add_argument('--tok', default='tok.json')\n"
        "rows = open('data/labels.csv').read()\nprint('not/a/file')\n")
    out = CliRunner().invoke(cli, ["preflight", "train.py", "--backend", "modal"])
    assert out.exit_code == 0, out.output  # a warning, not a failure
    warning = next(line for line in out.output.splitlines() if line.startswith("! "))
    assert "data/labels.csv" in warning and "train.py:4" in warning and "tok.json" in warning
    assert "--add-local tok.json --add-local data/labels.csv" in out.output  # file order
    shipped = CliRunner().invoke(cli, ["preflight", "train.py", "--backend", "modal",
                                       "--add-local", "data", "--add-local", "tok.json"])
    assert shipped.exit_code == 0 and "! " not in shipped.output, shipped.output


_CREDENTIALS = [
    ({}, "", False, "no token"),
    ({"MODAL_TOKEN_ID": "ak-1"}, "", False, "only token_id"),
    ({"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": "as-1"}, "", True, "MODAL_TOKEN_ID"),
    ({}, '[me]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\nactive = true\n', True, "'me'"),
    # the id in the environment, the secret in the active profile: the client combines them
    ({"MODAL_TOKEN_ID": "ak-2"}, '[me]\ntoken_secret = "as-1"\nactive = true\n', True,
     "'me'"),
    ({}, '[a]\ntoken_id = "x"\ntoken_secret = "y"\n[b]\ntoken_id = "x"\n'
         'token_secret = "y"\n', False, "No Modal profile is active"),
    ({"MODAL_PROFILE": "b"}, '[a]\ntoken_id = "x"\ntoken_secret = "y"\n[b]\n'
                             'token_id = "x"\ntoken_secret = "y"\n', True, "'b'"),
    ({"MODAL_PROFILE": "c"}, '[a]\ntoken_id = "x"\ntoken_secret = "y"\n', False, "'c'"),
    ({"MODAL_OAUTH_REFRESH_TOKEN": "r", "MODAL_OAUTH_CLIENT_ID": "oc-1",
      "MODAL_OAUTH_CLIENT_SECRET": "ov-1"}, "", True, "OAuth"),
    ({"MODAL_OAUTH_REFRESH_TOKEN": "r"}, "", False, "incomplete"),
]


_RESOLVE = """
import importlib, json, os, sys
import modal.config
from trainguard.preflight import check_modal_credentials
out = []
for env, config in json.loads(sys.stdin.read()):
    for key in [k for k in os.environ if k.startswith("MODAL_")]:
        del os.environ[key]
    os.environ.update(env, MODAL_CONFIG_PATH=config)
    importlib.reload(modal.config)  # the client reads its file and profile at import
    r = check_modal_credentials()
    out.append([r.ok, r.detail, r.fix])
print(json.dumps(out))
"""


def test_credentials_resolve_as_the_installed_client_resolves_them(tmp_path):
    import json
    import os
    import subprocess
    import sys

    cases = []
    for n, (env, toml, _ok, _needle) in enumerate(_CREDENTIALS):
        config = tmp_path / f"modal-{n}.toml"
        if toml:
            config.write_text(toml)
        cases.append([env, str(config)])
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    run = subprocess.run([sys.executable, "-c", _RESOLVE], input=json.dumps(cases),
                         capture_output=True, text=True, env={**clean, "HOME": str(tmp_path)},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for (env, _toml, ok, needle), (got_ok, detail, fix) in zip(_CREDENTIALS, results, strict=True):
        assert (got_ok, needle in detail) == (ok, True), (env, detail)
        if not ok:
            assert "modal token new" in fix or "unset" in fix


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
    jobs = tmp_path / "home" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())


def test_preflight_gates_the_data_with_its_counts(tmp_path):
    from click.testing import CliRunner

    from trainguard.cli import cli

    script = tmp_path / "train.py"
    script.write_text("import os\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.json").write_text("[0, 0]")
    args = ["preflight", str(script), "--run-dir", str(tmp_path / "run"), "--data", str(cache),
            "--data-stats", "tests.unit.test_data_manifest:count_positive",
            "--data-pattern", "*.json"]
    failed = CliRunner().invoke(cli, [*args, "--data-require", "positive > 0"])
    assert failed.exit_code == 6, failed.output
    assert "✗ data" in failed.output and "positive > 0 (it is 0)" in failed.output
    ok = CliRunner().invoke(cli, [*args, "--data-require", "windows >= 2"])
    assert ok.exit_code == 0 and "✓ data" in ok.output and "windows=2" in ok.output
