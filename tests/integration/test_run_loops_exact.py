"""Loops written the way scripts are written, killed with SIGKILL at random moments after
commits and restarted, end bit-identical to a run never interrupted (issue 13):

* a plain ``DataLoader(shuffle=True)`` over a dataset that augments in ``__getitem__``,
  with and without worker processes;
* a ``ResumableSampler`` in the script's own DataLoader, iterator created after track();
* torchdata's ``StatefulDataLoader`` with two workers;
* the epoch API with epoch-end validation and a hand-annealed ``args.lr``.

Each attempt is a forked child of one fork server (torch imported once), killed for
real; the kill lands a random number of output lines after a new commit was observed.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from tests.integration.run_scripts.attempts import ForkServer, kill_after_commit, newest_commit
from tests.integration.run_scripts.child import checkpoint_contents, events, metric_lines

MODULE = "tests.integration.run_scripts.train_loops"
SEED = int(os.environ.get("TRAINGUARD_KILL_SEED", "20240613"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("torchdata")  # the dev extra
    server = ForkServer(tmp_path_factory.mktemp("forks"),
                        ("torch", "numpy", "trainguard.run", "torchdata.stateful_dataloader",
                         "torch.utils.data"))
    yield server
    server.close()


def _argv(run_dir, options) -> list[str]:
    return [MODULE, str(run_dir), *options]


def _without_paths(tree: dict) -> dict:
    """state.json minus the run directory recorded in a tracked ``args`` (it differs)."""
    args = tree["tree"].get("args", {}).get("state")
    if args:
        for part in args.values():
            part.pop("run_dir", None)
    return tree


def run_killed_and_resumed(server, tmp_path, options, kills=3, at_line=None):
    """A reference run (concurrently) and a run killed ``kills`` times then finished;
    returns (reference dir, resumed dir) after asserting both ended normally."""
    log = tmp_path / "log"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    ref = server.start(_argv(reference, options), module=MODULE, stderr=log, follow=False)
    rng = random.Random(f"{SEED}-{options}")
    bit = 0
    for k in range(kills):
        attempt = server.start(_argv(resumed, options), module=MODULE, stderr=log)
        code = kill_after_commit(attempt, resumed, rng,
                                 at_line=at_line if k % 2 == 1 else None)
        if code == 0:  # it finished before its kill came (a very slow parent)
            break
        assert code == -9, log.read_text()[-3000:]
        bit += 1
    assert bit >= 1, "no kill landed before the run finished"
    final = server.start(_argv(resumed, options), module=MODULE, stderr=log, follow=False)
    assert final.wait() == 0, log.read_text()[-3000:]
    assert ref.wait() == 0, log.read_text()[-3000:]
    return reference, resumed


def assert_identical(reference, resumed) -> None:
    step = newest_commit(reference)
    assert newest_commit(resumed) == step
    expected_tree, expected = checkpoint_contents(reference, step)
    tree, tensors = checkpoint_contents(resumed, step)
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), f"{name} differs after the kills"
    assert _without_paths(tree) == _without_paths(expected_tree)
    # Every step any attempt ran (steps after a kill are run again) saw the same loss.
    losses = {line["step"]: line.get("loss") for line in metric_lines(reference)
              if "loss" in line}
    replayed = [line for line in metric_lines(resumed) if "loss" in line]
    assert len(replayed) > len(losses), "no step was ever re-run: the kills did not bite"
    for line in replayed:
        assert line["loss"] == losses[line["step"]], f"step {line['step']} diverged"
    assert events(resumed, "resume"), "no attempt resumed"


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_shuffled_dataloader_with_augmentation(server, tmp_path, workers):
    options = ["--loop", "plain", "--workers", str(workers)]
    if workers:
        options.append("--drop-last")
    assert_identical(*run_killed_and_resumed(server, tmp_path, options))


def test_resumable_sampler_in_own_dataloader_iterator_made_after_track(server, tmp_path):
    assert_identical(*run_killed_and_resumed(server, tmp_path, ["--loop", "sampler"]))


def test_stateful_dataloader_with_two_workers(server, tmp_path):
    assert_identical(*run_killed_and_resumed(server, tmp_path,
                                             ["--loop", "stateful", "--workers", "2"]))


def test_epoch_api_with_validation_and_annealed_lr(server, tmp_path):
    # Every other attempt is killed inside the epoch-end work (at "validate E").
    reference, resumed = run_killed_and_resumed(server, tmp_path, ["--loop", "epochs"],
                                                kills=4, at_line="validate")
    assert_identical(reference, resumed)
    tree, _ = checkpoint_contents(resumed, newest_commit(resumed))
    args = tree["tree"]["args"]["state"]["values"]
    assert args["validations"] == 4  # the epoch-end work counted once per epoch
    assert args["lr"] != 0.05  # annealed by hand, and restored
    # One checkpoint per epoch end (reason epoch/final), each with its validation loss.
    ends = [line for line in events(resumed, "commit") if line["reason"] in ("epoch", "final")]
    assert {line["step"] for line in ends} == {13, 26, 39, 52}
