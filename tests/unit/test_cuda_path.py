"""The CUDA path of a save: pinned arena, side-stream copies ordered after training.

CI has no GPU, so these run only where CUDA is present (the device machine); the same
behaviour on CPU is covered by test_async_incremental.py.
"""

from __future__ import annotations

import pytest
import torch

from trainguard import CheckpointManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(width: int = 2048, layers: int = 8) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).cuda()


def test_save_sees_kernels_queued_before_it_and_not_mutations_after(tmp_path):
    """Work queued on the training stream before save() is in the snapshot; in-place
    updates launched right after save() returns are not (the copy stream waited for the
    first, and was synchronized before returning)."""
    model = _model()
    mgr = CheckpointManager(str(tmp_path))
    big = torch.randn(8192, 8192, device="cuda")
    with torch.no_grad():
        for _ in range(20):  # keep the training stream busy so a missing wait would show
            big = big @ big / 8192 ** 0.5
        for p in model.parameters():
            p.add_(1.0)  # queued behind the matmuls
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    handle = mgr.save(1, {"model": model})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)  # right after save() returned
    handle.wait()
    assert mgr.writer.arena.pinned
    target = _model()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    assert mgr.restore({"model": target}) == 1
    for key, value in target.state_dict().items():
        assert value.device.type == "cuda"
        assert torch.equal(value.cpu(), expected[key]), key
    mgr.close()


def test_optimizer_state_on_cuda_round_trips_and_arena_is_reused(tmp_path):
    model = _model(layers=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(16, 2048, device="cuda")).square().mean().backward()
    opt.step()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, {"model": model, "optim": opt}).wait()
    buffer = mgr.writer.arena._buffer.data_ptr()
    mgr.save(2, {"model": model, "optim": opt}).wait()
    assert mgr.writer.arena._buffer.data_ptr() == buffer  # allocated once, reused
    model2 = _model(layers=4)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert mgr.restore({"model": model2, "optim": opt2}) == 2
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[q][key].device.type == "cuda"
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
    mgr.close()


def test_incremental_on_cuda_skips_frozen_and_sees_updates(tmp_path):
    torch.manual_seed(0)
    frozen = torch.nn.Embedding(100_000, 256).cuda().requires_grad_(False)
    head = torch.nn.Linear(256, 256).cuda()
    state = {"frozen": frozen, "head": head}
    mgr = CheckpointManager(str(tmp_path), incremental=True)
    first = mgr.save(1, state).wait().manifest.total_bytes
    with torch.no_grad():
        head.weight.add_(1.0)
    second = mgr.save(2, state).wait().manifest.total_bytes
    assert second < first * 0.05
    with torch.no_grad():
        frozen.weight.data[-1].add_(1.0)  # through .data: no version bump; sampled row
    third = mgr.save(3, state).wait().manifest.total_bytes
    assert third >= frozen.weight.nbytes
    restored = {"frozen": torch.nn.Embedding(100_000, 256).cuda(),
                "head": torch.nn.Linear(256, 256).cuda()}
    assert mgr.restore(restored) == 3
    assert torch.equal(restored["frozen"].weight, frozen.weight)
    assert torch.equal(restored["head"].weight, head.weight)
    mgr.close()
