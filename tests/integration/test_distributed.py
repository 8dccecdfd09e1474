"""torch.distributed runs (gloo, CPU): DDP kill/restart exactness, FSDP2 state saved on 4
ranks restored on 2 and 1, a rank killed mid-save, and the manifest written only after
every rank finished. Each test starts real processes (about 2 s of torch import each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from trainguard.checkpoint import CheckpointManager
from trainguard.run.distributed import ModelOptimizerState

SCRIPTS = Path(__file__).parent / "dist_scripts"
ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", **extra)
    env.pop("TRAINGUARD_RUN_DIR", None)
    return env


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(SCRIPTS / "ddp_train.py"), *args]
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
    assert "state.json" in manifest["files"]
    assert (tmp_path / "res/ranks/rank-00001/metrics.jsonl").exists()


def _load_on_one(run_dir: Path) -> dict:
    """Restore in this process alone (no process group): DTensors load as full tensors."""
    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"app": ModelOptimizerState(model, opt), "extra": torch.zeros(5),
             "counters": {"seen": 0}}
    assert CheckpointManager(run_dir).restore(state) == 10
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
    assert {f"rank{r:05d}.distcp" for r in range(4)} <= set(info.manifest.files)
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


def test_rank_killed_during_save_leaves_previous_checkpoint_latest(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    first = _sharded("save", 2, run_dir, out, step=5)
    assert first.returncode == 0, first.stderr[-3000:]
    killed = _sharded("save", 2, run_dir, out, step=10, TG_KILL_RANK="1")
    assert killed.returncode != 0
    mgr = CheckpointManager(run_dir)
    assert mgr.latest_valid().step == 5
    assert not (run_dir / "checkpoints/step-000000010/manifest.json").exists()
    assert mgr.verify(5).valid
