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

import pytest
import torch

from tests.integration.run_scripts.attempts import killed_and_resumed, newest_commit
from tests.integration.run_scripts.child import checkpoint_contents, events, metric_lines

MODULE = "tests.integration.run_scripts.train_loops"
SEED = os.environ.get("TRAINGUARD_KILL_SEED", "20240613")


def _without(node, path: str):
    """``node`` with every string equal to ``path`` dropped (a tracked ``args`` holds the
    run directory, which differs between the two runs)."""
    if isinstance(node, dict):
        return {k: _without(v, path) for k, v in node.items() if v != path}
    if isinstance(node, list):
        return [_without(v, path) for v in node]
    return node


def _without_python_rng(node):
    """``node`` without python's ``random`` state: a script that never seeds it (and
    never uses it) starts each process from a different one, which changes nothing."""
    if isinstance(node, dict):
        return {k: _without_python_rng(v) for k, v in node.items() if k != "python"}
    if isinstance(node, list):
        return [_without_python_rng(v) for v in node]
    return node


def assert_identical(reference, resumed, python_seeded: bool = True) -> None:
    """Final checkpoints equal tensor for tensor and in state.json; every step any
    attempt ran (steps after a kill are run again) saw the loss the reference saw."""
    step = newest_commit(reference)
    assert newest_commit(resumed) == step
    expected_tree, expected = checkpoint_contents(reference, step)
    tree, tensors = checkpoint_contents(resumed, step)
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), f"{name} differs after the kills"
    tree, expected_tree = _without(tree, str(resumed)), _without(expected_tree, str(reference))
    if not python_seeded:
        tree, expected_tree = _without_python_rng(tree), _without_python_rng(expected_tree)
    assert tree == expected_tree
    losses = {line["step"]: line["loss"] for line in metric_lines(reference) if "loss" in line}
    replayed = [line for line in metric_lines(resumed) if "loss" in line]
    if losses:
        assert len(replayed) > len(losses), "no step was ever re-run: the kills did not bite"
    for line in replayed:
        assert line["loss"] == losses[line["step"]], f"step {line['step']} diverged"
    assert events(resumed, "resume"), "no attempt resumed"


def run_loop(server, tmp_path, options, **kwargs):
    return killed_and_resumed(server, tmp_path, lambda run_dir: [MODULE, str(run_dir), *options],
                              {"module": MODULE}, seed=f"{SEED}-{options}", **kwargs)


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_shuffled_dataloader_with_augmentation(fork_server, tmp_path, workers):
    options = ["--loop", "plain", "--workers", str(workers)]
    if workers:
        options.append("--drop-last")
    assert_identical(*run_loop(fork_server, tmp_path, options))


def test_resumable_sampler_in_own_dataloader_iterator_made_after_track(fork_server, tmp_path):
    assert_identical(*run_loop(fork_server, tmp_path, ["--loop", "sampler"]))


def test_stateful_dataloader_with_two_workers(fork_server, tmp_path):
    pytest.importorskip("torchdata")  # the dev extra
    assert_identical(*run_loop(fork_server, tmp_path, ["--loop", "stateful", "--workers", "2"]))


def test_epoch_api_with_validation_and_annealed_lr(fork_server, tmp_path):
    # Every other attempt is killed inside the epoch-end work (at "validate E").
    reference, resumed = run_loop(fork_server, tmp_path, ["--loop", "epochs"], kills=4,
                                  at_line="validate")
    assert_identical(reference, resumed)
    tree, _ = checkpoint_contents(resumed, newest_commit(resumed))
    args = tree["tree"]["args"]["state"]["values"]
    assert args["validations"] == 4  # the epoch-end work counted once per epoch
    assert args["lr"] != 0.05  # annealed by hand, and restored
    ends = [line for line in events(resumed, "commit") if line["reason"] in ("epoch", "final")]
    assert {line["step"] for line in ends} == {13, 26, 39, 52}  # each epoch end committed
