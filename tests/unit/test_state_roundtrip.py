"""Every kind of training state round-trips bit-exactly and is restored in place."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import make_model, train_steps
from trainguard import CheckpointManager, RNGState, StateMismatch


def _equal_state_dicts(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not _equal_state_dicts(x, y):
                return False
        elif x != y:
            return False
    return True


def test_model_optimizer_scheduler_scaler_roundtrip_in_place(tmp_path, trained):
    model, optimizer, scheduler = trained
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = optimizer.state_dict()
    saved_opt = {"state": {k: {n: t.clone() if isinstance(t, torch.Tensor) else t
                               for n, t in v.items()} for k, v in saved_opt["state"].items()},
                 "param_groups": [dict(g) for g in saved_opt["param_groups"]]}
    saved_sched, saved_scaler = scheduler.state_dict(), scaler.state_dict()
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    mgr = CheckpointManager(tmp_path)
    mgr.save(7, state)

    params_before = [id(p) for p in model.parameters()]
    train_steps(model, optimizer, scheduler, steps=4, seed=9)  # move everything away
    scaler.update(new_scale=2.0)
    assert not _equal_state_dicts(saved_model, model.state_dict())

    assert mgr.restore(state) == 7
    assert [id(p) for p in model.parameters()] == params_before  # same objects, in place
    assert _equal_state_dicts(saved_model, model.state_dict())
    restored_opt = optimizer.state_dict()
    assert _equal_state_dicts(saved_opt["state"], restored_opt["state"])
    assert saved_opt["param_groups"] == restored_opt["param_groups"]
    assert scheduler.state_dict() == saved_sched
    assert scaler.state_dict() == saved_scaler


def test_training_continues_identically_after_restore(tmp_path):
    """Save mid-run, finish; restore into fresh objects, finish: identical weights."""
    def setup():
        model = make_model(seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 2)

    model, opt, sched = setup()
    train_steps(model, opt, sched, steps=3, seed=1)
    state = {"model": model, "optimizer": opt, "scheduler": sched}
    CheckpointManager(tmp_path).save(3, state).wait()
    train_steps(model, opt, sched, steps=3, seed=2)

    model2, opt2, sched2 = setup()
    CheckpointManager(tmp_path).restore({"model": model2, "optimizer": opt2, "scheduler": sched2})
    train_steps(model2, opt2, sched2, steps=3, seed=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_streams_continue_identically(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"rng": RNGState()})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    mgr.restore({"rng": RNGState()})
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_nested_values_dtypes_and_counters(tmp_path):
    extra = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(10),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "noncontig": torch.arange(12.0).reshape(3, 4).t(),
        "np": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "list": [1, 2.5, "s", None, True, [torch.ones(2)]],
        "tuple": (1, (2, 3)),
        "int_keys": {0: "a", 1: {"b": 2}},
        "dtype": torch.float16,
        "bytes": b"\x00\xff",
        "inf": float("inf"),
    }
    state = {"step": 41, "epoch": 2, "extra": extra}
    mgr = CheckpointManager(tmp_path)
    mgr.save(41, state)
    fresh: dict = {"step": 0, "epoch": 0, "extra": {}}
    assert mgr.restore(fresh) == 41
    assert fresh["step"] == 41 and fresh["epoch"] == 2
    got = fresh["extra"]
    for key in ["bf16", "f16", "i64", "bool", "u8", "scalar", "empty", "noncontig"]:
        assert got[key].dtype == extra[key].dtype and torch.equal(got[key], extra[key]), key
    assert got["np"].dtype == np.uint32 and np.array_equal(got["np"], extra["np"])
    assert got["list"][:5] == [1, 2.5, "s", None, True]
    assert torch.equal(got["list"][5][0], torch.ones(2))
    assert got["tuple"] == (1, (2, 3))
    assert got["int_keys"] == {0: "a", 1: {"b": 2}}
    assert got["dtype"] is torch.float16 and got["bytes"] == b"\x00\xff"
    assert got["inf"] == float("inf")


def test_plain_tensors_are_written_back_in_place(tmp_path):
    live = torch.zeros(4)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"buf": torch.arange(4.0)})
    state = {"buf": live}
    mgr.restore(state)
    assert state["buf"] is live and torch.equal(live, torch.arange(4.0))


def test_shape_mismatch_is_refused_with_the_path(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": torch.zeros(4)})
    with pytest.raises(StateMismatch, match="'w'.*torch.float32 \\(4,\\).*\\(5,\\)"):
        mgr.restore({"w": torch.zeros(5)})


def test_values_that_need_pickle_are_refused_at_save(tmp_path):
    class Opaque:
        pass

    with pytest.raises(TypeError, match="extra/thing.*Opaque.*pickle is never used"):
        CheckpointManager(tmp_path).save(1, {"extra": {"thing": Opaque()}})


def test_shards_are_bounded_and_open_with_safetensors(tmp_path):
    tensors = {f"t{i}": torch.randn(256, 256) for i in range(6)}  # 256 KiB each
    tensors["small_f16"] = torch.randn(3).half()
    mgr = CheckpointManager(tmp_path, max_shard_bytes=600 << 10)
    info = mgr.save(5, {"w": tensors}).wait()
    shards = sorted(n for n in info.manifest.files if n.endswith(".safetensors"))
    assert len(shards) >= 3
    seen = {}
    for name in shards:
        path = tmp_path / info.key / name
        assert path.stat().st_size <= (600 << 10) + 4096
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                seen[key] = f.get_tensor(key)
    assert set(seen) == {f"w/{k}" for k in tensors}
    for key, tensor in tensors.items():
        assert torch.equal(seen[f"w/{key}"], tensor)


def test_restore_keeps_tied_weights_tied_and_parameters_the_same_objects(tmp_path):
    """A CPU module adopts the verified restored memory (no copy), unless that would
    untie weights that share memory: then it copies."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x))

    for make in (Tied, lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))):
        torch.manual_seed(0)
        model = make()
        mgr = CheckpointManager(tmp_path / type(model).__name__)
        mgr.save(1, {"model": model}, blocking=True)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        with torch.no_grad():
            for p in params:
                p.zero_()
        for _ in range(2):  # the second restore starts from adopted memory
            mgr.restore({"model": model})
            assert list(model.parameters()) == params  # same Parameter objects
            for key, value in model.state_dict().items():
                assert torch.equal(value, expected[key]), key
        if isinstance(model, Tied):
            assert model.out.weight is model.emb.weight
            assert model.out.weight.data_ptr() == model.emb.weight.data_ptr()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randint(0, 10, (3,)) if isinstance(model, Tied) else torch.randn(3, 4)
        model(x).sum().backward()
        optimizer.step()  # training goes on in the adopted memory
