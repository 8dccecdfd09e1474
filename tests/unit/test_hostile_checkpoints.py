"""Hostile checkpoint contents (issue 14, items 1-3, 7, 8): whatever a manifest, state file
or shard holds, every reader (restore, verify, ls, gc --dry-run) skips what does not parse
into the schema, names it, and goes on to the good steps: never a traceback."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from tests.unit import hostile
from trainguard import CheckpointManager
from trainguard.cli import cli


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_every_reader_skips_step_2(run, caplog, names: str, listed_corrupt=False) -> None:
    """restore falls back to step 1; verify and gc call step 2 corrupt, naming ``names``;
    ls works, and (``listed_corrupt``: a bad manifest, found by the cheap check) calls it
    corrupt too. A bad state file or shard is found by verify, which reads every byte."""
    mgr = CheckpointManager(run)
    target = hostile.blank()
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert mgr.restore(target) == 1
    assert torch.equal(target["w"], hostile.state(1)["w"]) and target["step"] == 1
    assert "skipping checkpoint step 2" in caplog.text and names in caplog.text
    info = mgr.verify(2)
    assert not info.valid and names in info.problem
    status = "corrupt" if listed_corrupt else "valid"
    assert [i.valid for i in mgr.list()] == [True, not listed_corrupt]

    listed = _cli("ls", run)
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if line.split()[:1] == ["2"])
    assert status in row
    rows = json.loads(_cli("ls", "--json", run).output)
    assert [r["status"] for r in rows] == ["valid", status]
    checked = _cli("verify", run)
    assert checked.exit_code == 1 and isinstance(checked.exception, SystemExit), checked.output
    assert "step 1: ok" in checked.output and "step 2: CORRUPT" in checked.output
    assert "step 2: ok" not in checked.output
    dry = _cli("gc", "--keep-last", "1", "--dry-run", run)
    assert dry.exit_code == 0, dry.output
    if listed_corrupt:  # else step 2 passes the cheap check and is the newest: kept
        assert "[2]" in dry.output, dry.output


def _manifest_with(run, field_path: tuple, literal: str) -> str:
    """The manifest of step 2 as JSON text with ``literal`` at ``field_path``."""
    doc = hostile.manifest_doc(run, 2)
    node = doc
    for part in field_path[:-1]:
        node = node[part] if part != "<first>" else node[next(iter(node))]
    node[field_path[-1]] = "@@HOLE@@"
    return json.dumps(doc).replace('"@@HOLE@@"', literal)


MANIFEST_CASES = {
    # item 1: numbers that overflow, nesting that recurses, wrong types
    "step-1e999": (("step",), "1e999"),
    "size-1e999": (("files", "<first>", "size"), "1e999"),
    "size-negative": (("files", "<first>", "size"), "-5"),
    "size-float": (("files", "<first>", "size"), "12.5"),
    "step-string": (("step",), '"abc"'),
    "step-bool": (("step",), "true"),
    "files-list": (("files",), "[]"),
    "metrics-nesting-bomb": (("metrics",), "[" * 100_000 + "]" * 100_000),
    "tags-nesting-bomb": (("tags",), '{"a":' * 50_000 + "1" + "}" * 50_000),
    "refs-not-a-list": (("refs",), '{"a": 1}'),
    "ref-step-1e999": (("refs",), '[{"step": 1e999, "name": "x", "size": 1, "xxh3_128": "0"}]'),
    "checksum-number": (("files", "<first>", "xxh3_128"), "12"),
    "huge-int": (("step",), "9" * 5000),
    # item 3: what restore used to accept and ls then crashed on
    "metric-string": (("metrics", "loss"), '"abc"'),
    "created-1e300": (("created_at",), "1e300"),
    "created-nan": (("created_at",), "NaN"),
    "created-infinity": (("created_at",), "Infinity"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_manifest_outside_the_schema_is_corrupt_for_every_reader(tmp_path, caplog, case):
    run = hostile.make_run(tmp_path / "run")
    field_path, literal = MANIFEST_CASES[case]
    hostile.write_manifest(run, 2, _manifest_with(run, field_path, literal))
    _assert_every_reader_skips_step_2(run, caplog, "manifest", listed_corrupt=True)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[1, 2]", b"null"])
def test_manifest_that_is_not_an_object_is_corrupt(tmp_path, caplog, raw):
    run = hostile.make_run(tmp_path / "run")
    hostile.write_manifest(run, 2, raw)
    _assert_every_reader_skips_step_2(run, caplog, "manifest", listed_corrupt=True)


def test_nan_metric_is_valid_and_listed(tmp_path):
    """The schema is not stricter than what a save writes: a NaN loss is a number."""
    run = hostile.make_run(tmp_path / "run")
    hostile.write_manifest(run, 2, _manifest_with(run, ("metrics", "loss"), "NaN"))
    assert CheckpointManager(run).restore(hostile.blank()) == 2
    listed = _cli("ls", run)
    assert listed.exit_code == 0 and "loss=nan" in listed.output


def _tensor(name: str, **extra) -> dict:
    return {"__tg__": "tensor", "name": name, "device": "cpu", **extra}


# item 2 (and 7): state files whose checksum matches but whose tree is not a state tree
STATE_CASES = {
    "nesting-bomb": '{"tree": {"w": ' + "[" * 100_000 + "]" * 100_000 + "}}",
    "tensor-refs-list": {"tree": {"w": _tensor("w")}, "tensor_refs": [1, 2]},
    "tensor-ref-step-abc": {"tree": {"w": _tensor("w")},
                            "tensor_refs": {"w": ["abc", "tensors-00000.safetensors", "w"]}},
    "tensor-ref-short": {"tree": {"w": _tensor("w")}, "tensor_refs": {"w": [1]}},
    "bad-device": {"tree": {"w": _tensor("w", device="not a device")}},
    "device-not-str": {"tree": {"w": _tensor("w", device=7)}},
    "object-ndarray": {"tree": {"w": {"__tg__": "ndarray", "name": "w", "dtype": "|O",
                                      "shape": [2]}}},
    "ndarray-wrong-shape": {"tree": {"w": {"__tg__": "ndarray", "name": "w", "dtype": "|u1",
                                           "shape": [1000]}}},
    "ndarray-negative-shape": {"tree": {"w": {"__tg__": "ndarray", "name": "w",
                                              "dtype": "|u1", "shape": [-1]}}},
    "tensor-missing": {"tree": {"w": _tensor("nope")}},
    "tensor-without-name": {"tree": {"w": {"__tg__": "tensor"}}},
    "unknown-tag": {"tree": {"w": {"__tg__": "pickle", "data": "x"}}},
    "tag-not-str": {"tree": {"w": {"__tg__": ["tensor"]}}},
    "dict-pair-short": {"tree": {"w": {"__tg__": "dict", "items": [[1]]}}},
    "dict-key-unhashable": {"tree": {"w": {"__tg__": "dict", "items": [[{"a": 1}, 2]]}}},
    "tuple-items-dict": {"tree": {"w": {"__tg__": "tuple", "items": {"a": 1}}}},
    "bytes-bad-hex": {"tree": {"w": {"__tg__": "bytes", "hex": "zz"}}},
    "stateful-no-state": {"tree": {"w": {"__tg__": "stateful", "type": "x"}}},
    "tree-not-dict": {"tree": [1, 2, 3]},
    "doc-list": [1, 2],
    "no-tree": {"tensor_refs": {}},
    # item 7: a dtype tag names any torch attribute
    "dtype-torch-load": {"tree": {"w": _tensor("w"), "step": {"__tg__": "dtype",
                                                              "name": "load"}}},
    "dtype-dunder": {"tree": {"w": _tensor("w"), "step": {"__tg__": "dtype",
                                                          "name": "__builtins__"}}},
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_file_outside_the_schema_is_corrupt_and_restore_falls_back(tmp_path, caplog,
                                                                          case):
    run = hostile.make_run(tmp_path / "run")
    doc = STATE_CASES[case]
    raw = doc if isinstance(doc, str) else json.dumps(doc)
    victim = hostile.member(run, 2, "state")
    hostile.rewrite_member(run, 2, victim, raw.encode())
    _assert_every_reader_skips_step_2(run, caplog, victim.name)


def test_dtype_values_still_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, {"dtypes": [torch.float32, torch.bfloat16, torch.int8, torch.bool]},
             blocking=True)
    target = {"dtypes": None}
    assert mgr.restore(target) == 1
    assert target["dtypes"] == [torch.float32, torch.bfloat16, torch.int8, torch.bool]


def _shard_with_offsets(run, offsets: dict) -> bytes:
    """Step 2's shard rebuilt with the tensors ``w`` and ``b`` at the given byte ranges."""
    data = bytes(16 * 4 + 3 * 4)
    header = {"__metadata__": {"format": "pt"}}
    shapes = {"w": [4, 4], "b": [3]}
    for name, (start, end) in offsets.items():
        header[name] = {"dtype": "F32", "shape": shapes[name], "data_offsets": [start, end]}
    return hostile.safetensors_bytes(header, data)


# item 8: tensors that share or overlap bytes, or leave bytes no tensor owns
SHARD_CASES = {
    "overlap": {"w": (0, 64), "b": (52, 64)},
    "same-range": {"w": (0, 64), "b": (0, 12)},
    "reordered": {"w": (12, 76), "b": (0, 12)},  # control: valid, in another order
    "as-written": {"w": (0, 64), "b": (64, 76)},  # control: the layout a save writes
}


def test_safetensors_control_layouts_load(tmp_path):
    """Tensors in any order, covering every byte: accepted (as safetensors accepts them)."""
    for case in ("reordered", "as-written"):
        run = hostile.make_run(tmp_path / case)
        victim = hostile.member(run, 2, "shard")
        hostile.rewrite_member(run, 2, victim, _shard_with_offsets(run, SHARD_CASES[case]))
        assert CheckpointManager(run).restore(hostile.blank()) == 2


@pytest.mark.parametrize("case", ["overlap", "same-range"])
def test_safetensors_with_overlapping_tensors_is_corrupt(tmp_path, caplog, case):
    run = hostile.make_run(tmp_path / "run")
    victim = hostile.member(run, 2, "shard")
    hostile.rewrite_member(run, 2, victim, _shard_with_offsets(run, SHARD_CASES[case]))
    _assert_every_reader_skips_step_2(run, caplog, victim.name)


def test_safetensors_with_bytes_no_tensor_owns_is_corrupt(tmp_path, caplog):
    """The format forbids holes (they make polyglot files): the data must be fully indexed."""
    run = hostile.make_run(tmp_path / "run")
    victim = hostile.member(run, 2, "shard")
    header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [68, 80]}}
    hostile.rewrite_member(run, 2, victim, hostile.safetensors_bytes(header, bytes(80)))
    _assert_every_reader_skips_step_2(run, caplog, victim.name)


SHARD_HEADER_CASES = {
    "shape-1e999": '{"w": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 64]}}',
    "shape-negative": '{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 64]}}',
    "shape-mismatch": '{"w": {"dtype": "F32", "shape": [5, 5], "data_offsets": [0, 64]}}',
    "offsets-float": '{"w": {"dtype": "F32", "shape": [16], "data_offsets": [0.0, 64.0]}}',
    "offsets-three": '{"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 32, 64]}}',
    "nesting-bomb": '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "entry-not-object": '{"w": 5}',
    "header-list": "[1]",
    "metadata-not-strings": '{"__metadata__": {"a": [1]}, '
                            '"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}',
    "dtype-unknown": '{"w": {"dtype": "F99", "shape": [16], "data_offsets": [0, 64]}}',
}


@pytest.mark.parametrize("case", sorted(SHARD_HEADER_CASES))
def test_safetensors_header_outside_the_format_is_corrupt(tmp_path, caplog, case):
    run = hostile.make_run(tmp_path / "run")
    victim = hostile.member(run, 2, "shard")
    body = SHARD_HEADER_CASES[case].encode()
    body += b" " * (-len(body) % 8)
    raw = len(body).to_bytes(8, "little") + body + bytes(64)
    hostile.rewrite_member(run, 2, victim, raw)
    _assert_every_reader_skips_step_2(run, caplog, victim.name)


def test_a_save_refuses_what_restore_would_refuse(tmp_path):
    """Never write a checkpoint the readers' schema rejects: too deep, or an array whose
    dtype cannot be rebuilt without pickle (or loses its fields)."""
    import numpy as np

    mgr = CheckpointManager(tmp_path / "run")
    deep: list = []
    for _ in range(150):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than 100"):
        mgr.save(1, {"deep": deep})
    with pytest.raises(TypeError, match="structured"):
        mgr.save(1, {"rec": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")])})
    mgr.save(1, {"ok": [[[1]]], "when": np.zeros(2, dtype="<M8[s]")}, blocking=True)
    assert [i.step for i in mgr.list()] == [1] and mgr.verify(1).valid
    mgr.close()
