"""torch.distributed runs (gloo, CPU): DDP kill/restart exactness, FSDP2 state saved on 4
ranks restored on 2 and 1, the manifest written only after every rank finished; sharded
saves in the background (the values of the save call's moment, a rank killed or failing
in its background write), and sharded runs mirrored to a second tier and restored from
it. Each test starts real processes (about 2 s of torch import each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainguard.checkpoint import CheckpointManager
from trainguard.run.distributed import ModelOptimizerState

SCRIPTS = Path(__file__).parent / "dist_scripts"
ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", **extra)
    env.pop("TRAINGUARD_RUN_DIR", None)
    return env


def _torchrun(tmp_path: Path, *args: str, script: str = "ddp_train.py"
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(SCRIPTS / script), *args]
    return subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def _sharded(mode: str, world: int, run_dir: Path, out: Path, step: int = 10,
             **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPTS / "sharded_worker.py"), mode, str(world), str(run_dir),
           str(out), str(step)]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=120)


def test_ddp_run_killed_and_restarted_ends_bit_identical(tmp_path):
    ref = _torchrun(tmp_path, "ref", "12", "ref.pt")
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = _torchrun(tmp_path, "res", "12", "res.pt", "7", "crashed")
    assert crashed.returncode != 0 and (tmp_path / "crashed").exists()
    assert CheckpointManager(tmp_path / "res").latest_valid().step == 6
    resumed = _torchrun(tmp_path, "res", "12", "res.pt", "7", "crashed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 6" in resumed.stderr
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "res.pt")
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # One copy, written by rank 0; rank 1 logs beside it, not over its heartbeat.
    manifest = json.loads((tmp_path / "res/checkpoints/step-000000012/manifest.json").read_text())
    assert f"state.{manifest['writer']}.json" in manifest["files"]
    assert (tmp_path / "res/ranks/rank-00001/metrics.jsonl").exists()


def _load_on_one(run_dir: Path, step: int = 10, mirror: str | None = None) -> dict:
    """Restore in this process alone (no process group): DTensors load as full tensors."""
    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"app": ModelOptimizerState(model, opt), "extra": torch.zeros(5),
             "counters": {"seen": 0}}
    assert CheckpointManager(run_dir, mirror=mirror).restore(state) == step
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for param, entry in opt.state.items():
        out.update({f"optim.{names[id(param)]}.{k}": v for k, v in entry.items()})
    out["extra"], out["counters"] = state["extra"], torch.tensor(state["counters"]["seen"])
    return out


def test_sharded_state_saved_on_4_restores_on_2_and_1(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    saved = _sharded("save", 4, run_dir, out, TG_SLOW_RANK="3")
    assert saved.returncode == 0, saved.stderr[-3000:]
    mgr = CheckpointManager(run_dir)
    info = mgr.verify(10)
    assert info.valid, info.problem
    assert {info.manifest.name_of(f"rank{r:05d}.distcp") for r in range(4)} \
        <= set(info.manifest.files)
    # The slow rank saw no manifest before writing; the commit came after it finished.
    existed, finished = (out / "slow.txt").read_text().split()
    assert existed == "0" and info.manifest.created_at >= float(finished)
    expected = torch.load(out / "expected.pt")
    loaded = _sharded("load", 2, run_dir, out)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    on_two = torch.load(out / "loaded-2.pt")
    assert sorted(on_two) == sorted(expected)
    assert [k for k in expected if not torch.equal(expected[k], on_two[k])] == []
    on_one = _load_on_one(run_dir)
    assert sorted(on_one) == sorted(expected)
    assert [k for k in expected if not torch.equal(expected[k], on_one[k])] == []


def _same(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []


def test_sharded_save_returns_before_its_write_with_the_values_of_that_moment(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    # Each rank's write waits until its save() returned and the state was changed in
    # place (+1000 to every parameter and moment); a save that blocked would fail.
    gated = _sharded("gated", 2, run_dir, out)
    assert gated.returncode == 0, gated.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((out / f"gated-{rank}.json").read_text())
        assert seen == {"done": False, "manifest": False, "committed": 10}
    _same(torch.load(out / "expected.pt"), _load_on_one(run_dir))


def test_rank_killed_during_background_write_leaves_previous_checkpoint_latest(tmp_path):
    run_dir, out, out_killed = tmp_path / "run", tmp_path / "out", tmp_path / "killed"
    out.mkdir()
    out_killed.mkdir()
    first = _sharded("save", 2, run_dir, out, step=5)
    assert first.returncode == 0, first.stderr[-3000:]
    killed = _sharded("save", 2, run_dir, out_killed, step=10, TG_KILL_RANK="1")
    assert killed.returncode != 0
    assert (out_killed / "returned-1").exists()  # killed after its save() had returned
    mgr = CheckpointManager(run_dir)
    assert mgr.latest_valid().step == 5
    assert not (run_dir / "checkpoints/step-000000010/manifest.json").exists()
    assert mgr.verify(5).valid


def test_failed_background_write_raises_on_next_save_wait_and_close(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    # Step 5 commits; then rank 1's writes of steps 6, 7 and 8 raise in the background.
    failed = _sharded("fail", 2, run_dir, out, step=5)
    assert failed.returncode == 0, failed.stderr[-3000:]
    for rank in (0, 1):  # every rank raises at the same call: no collective mismatch
        seen = json.loads((out / f"fail-{rank}.json").read_text())
        assert seen["again"] == "ok"  # each failure is raised once
        for call, step in (("save", 6), ("wait", 7), ("close", 8)):
            assert seen[call].startswith(f"CheckpointError: sharded save of step {step} "
                                         f"failed"), seen[call]
            assert "rank 1: RuntimeError('injected write failure on rank 1')" in seen[call]
    mgr = CheckpointManager(run_dir)
    assert [i.step for i in mgr.list() if i.valid] == [5]
    for step in (6, 7, 8):
        assert not (run_dir / f"checkpoints/step-{step:09d}/manifest.json").exists()


@pytest.mark.parametrize("tier", ["local", "s3"])
def test_sharded_run_is_mirrored_and_restores_from_the_mirror(tmp_path, tier, request):
    if tier == "s3":
        mirror = f"s3://{request.getfixturevalue('s3_env')}/run"
    else:
        mirror = str(tmp_path / "mirror")
    ran = _torchrun(tmp_path, "run", "6", "final.pt", mirror, script="fsdp_run.py")
    assert ran.returncode == 0, ran.stderr[-3000:]
    remote = CheckpointManager(mirror)
    assert [i.step for i in remote.list() if i.valid] == [2, 4, 6]
    assert remote.verify(6).valid  # every rank's shard file copied, checksums checked
    assert set(remote.verify(6).manifest.files) == set(
        CheckpointManager(tmp_path / "run").verify(6).manifest.files)
    shutil.rmtree(tmp_path / "run/checkpoints")  # the primary tier is lost
    final = torch.load(tmp_path / "final.pt")
    _same(final, _load_on_one(tmp_path / "run", step=6, mirror=mirror))
    if tier == "local":  # and on 2 ranks, as a fresh job on new machines would
        out = tmp_path / "out"
        out.mkdir()
        loaded = _sharded("load", 2, tmp_path / "run", out, step=6, TG_MIRROR=mirror)
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        _same(final, torch.load(out / "loaded-2.pt"))
