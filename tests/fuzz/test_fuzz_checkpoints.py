"""Fuzzing what a run directory holds (issue 14): manifests, state trees and safetensors
files, valid, truncated and mutated, written into step 2 of a run whose step 1 is good.

For every case, every reader (list, restore, verify, and ``trainguard ls``, ``ls --json``,
``verify``, ``gc --dry-run``):

* raises nothing but the documented errors, and the CLI never shows a traceback;
* finishes (a case that runs past the harness's deadline fails as hung);
* reads and writes nothing outside the run directory (an audit hook sees every open,
  rename, link and delete);
* restore returns the newest good step: 2 exactly when step 2 verifies byte for byte and
  parses into the schema, else 1 with step 1's values; cases built valid must give 2.

Case counts: ``TRAINGUARD_FUZZ_EXAMPLES`` per test (harness.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import xxhash
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import FUZZ, guarded_case
from trainguard import CheckpointManager
from trainguard.checkpoint.format import _CODES, MANIFEST, parse_safetensors
from trainguard.checkpoint.tree import DTYPES
from trainguard.cli import cli
from trainguard.errors import CheckpointCorrupt

STEP2 = "checkpoints/step-000000002"


def _state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(4, 4, generator=gen), "b": torch.randn(3, generator=gen),
            "arr": np.arange(6, dtype=np.int32).reshape(2, 3) * step, "step": step}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A run with good checkpoints at steps 1 and 2, copied afresh for every case."""
    run = tmp_path_factory.mktemp("fuzz-template") / "run"
    mgr = CheckpointManager(run)
    for step in (1, 2):
        mgr.save(step, _state(step), metrics={"loss": 1.0 / step})
    mgr.close()
    (run / ".trainguard.lock").unlink()
    return run


class Case:
    """One case's directories: ``root/run`` (a copy of the template) and ``root/outside``
    (files a reader must never touch)."""

    def __init__(self, template: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tgfuzz-"))
        self.run = self.root / "run"
        shutil.copytree(template, self.run, symlinks=True)
        (self.root / "outside").mkdir()
        self.step2 = self.run / STEP2
        self.manifest = json.loads((self.step2 / MANIFEST).read_text())

    def member(self, prefix: str) -> Path:
        return self.step2 / next(n for n in sorted(self.manifest["files"])
                                 if n.startswith(prefix))

    def rewrite(self, path: Path, data: bytes) -> None:
        """Replace a file of step 2; its manifest entry keeps up (size and checksum)."""
        path.write_bytes(data)
        self.manifest["files"][path.name] = {"size": len(data),
                                             "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
        (self.step2 / MANIFEST).write_text(json.dumps(self.manifest))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"trainguard {' '.join(map(str, args))} raised {result.exception!r}\n{result.output}"
    return result


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                                b.reshape(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def check_readers(case: Case, expect: int | None = None) -> int:
    """Every reader over the case's run; the invariants of the module docstring.

    Returns:
        The step restore chose.
    """
    mgr = CheckpointManager(case.run)
    listed = mgr.list()
    assert [i.step for i in listed] == [1, 2] and listed[0].valid
    target: dict = {}
    step = mgr.restore(target)
    verified = mgr.verify(2)
    resumable = listed[1].manifest is None or \
        listed[1].manifest.tags.get("resumable") != "false"
    assert step in (1, 2)
    assert (step == 2) == (verified.valid and resumable), verified.problem
    if not listed[1].valid:
        assert step == 1
    if step == 1:
        assert _same(target, _state(1))
    if expect is not None:
        assert step == expect, verified.problem
    incomplete = listed[1].manifest is None and listed[1].problem.startswith("incomplete:")
    rows = json.loads(_cli("ls", "--json", case.run).output)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["status"] == ("valid" if listed[1].valid else
                                 "incomplete" if incomplete else "corrupt")
    assert _cli("ls", case.run).exit_code == 0
    checked = _cli("verify", case.run)
    assert checked.exit_code == (0 if verified.valid or incomplete else 1), checked.output
    assert "step 1: ok" in checked.output
    assert _cli("gc", "--keep-last", "1", "--dry-run", case.run).exit_code == 0
    return step


def run_case(name: str, template: Path, plant, expect: int | None = None):
    """Make a case, let ``plant(case)`` damage step 2, check every reader; clean up."""
    case = Case(template)
    try:
        plant(case)
        with guarded_case(name, case.root, case.run) as outside:
            step = check_readers(case, expect)
        assert outside == [], outside
        return case, step
    finally:
        case.close()


# -- manifests ----------------------------------------------------------------------------

JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)
# Literals json.dumps never writes, but a file can hold.
RAW_LITERALS = st.sampled_from([
    "1e999", "-1e999", "1e-400", "-0", "9" * 5000, "1" * 400, "NaN", "-Infinity",
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "0" + "}" * 3000, '"\\ud800"', '"a\\u0000b"',
])
HOLE = "@@FUZZ@@"


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


def _mutate(doc, data) -> bytes:
    """``doc`` with a few values replaced, removed or spliced with raw text, as bytes,
    maybe then truncated or with a byte flipped."""
    doc = json.loads(json.dumps(doc))
    raw_literal = None
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = [p for p in _paths(doc) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["value", "raw", "delete"]), label="action")
        if action == "delete":
            del parent[path[-1]]
        elif action == "raw" and raw_literal is None:
            raw_literal = data.draw(RAW_LITERALS, label="literal")
            parent[path[-1]] = HOLE
        else:
            parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    text = json.dumps(doc)
    if raw_literal is not None:
        text = text.replace(json.dumps(HOLE), raw_literal, 1)
    raw = bytearray(text.encode())
    damage = data.draw(st.sampled_from(["none", "truncate", "flip"]), label="damage")
    if damage == "truncate":
        del raw[data.draw(st.integers(0, len(raw)), label="cut"):]
    elif damage == "flip" and raw:
        raw[data.draw(st.integers(0, len(raw) - 1), label="at")] ^= data.draw(
            st.integers(1, 255), label="bits")
    return bytes(raw)


@FUZZ
@given(data=st.data())
def test_fuzz_manifests(template, data):
    def plant(case):
        (case.step2 / MANIFEST).write_bytes(_mutate(case.manifest, data))

    run_case("manifest", template, plant)


@FUZZ
@given(metrics=st.dictionaries(st.text(max_size=8), st.floats(allow_infinity=True,
                                                               allow_nan=True), max_size=4),
       tags=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "resumable"),
                            st.text(max_size=8), max_size=4),
       reason=st.text(max_size=40), created=st.floats(0, 253402300799.0))
def test_fuzz_valid_manifests_restore_their_step(template, metrics, tags, reason, created):
    """The schema is no stricter than what a save may write: any such manifest loads."""
    def plant(case):
        case.manifest.update(metrics=metrics, tags=tags, reason=reason, created_at=created)
        (case.step2 / MANIFEST).write_text(json.dumps(case.manifest))

    run_case("manifest-valid", template, plant, expect=2)


# -- state trees -----------------------------------------------------------------------------

def _tagged(children):
    names = st.sampled_from(["w", "b", "arr", "nope", 5])
    return st.one_of(
        st.fixed_dictionaries({"__tg__": st.just("tensor"), "name": names, "device":
                               st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:99", "meta",
                                                "mps", "bogus", "", 7])}),
        st.fixed_dictionaries({"__tg__": st.just("ndarray"), "name": names,
                               "dtype": st.sampled_from(["<i4", "|u1", "<f8", "|O", "O",
                                                         "<M8[ns]", "|V4", "<U1", "abc", 5]),
                               "shape": st.lists(st.integers(-2, 30), max_size=3)
                               | JSON_VALUES}),
        st.fixed_dictionaries({"__tg__": st.just("tuple"),
                               "items": st.lists(children, max_size=3) | children}),
        st.fixed_dictionaries({"__tg__": st.just("dict"), "items": st.lists(
            st.lists(children, max_size=3), max_size=3) | children}),
        st.fixed_dictionaries({"__tg__": st.just("dtype"), "name": st.sampled_from(
            sorted(DTYPES)[:8] + ["load", "Tensor", "__class__", "float99", "nn", 3])}),
        st.fixed_dictionaries({"__tg__": st.just("bytes"),
                               "hex": st.text("0123456789abcdefxyz ", max_size=8) | children}),
        st.fixed_dictionaries({"__tg__": st.just("stateful"), "type": st.text(max_size=8)},
                              optional={"state": children}),
        st.fixed_dictionaries({"__tg__": st.text(max_size=6) | JSON_VALUES},
                              optional={"items": children, "name": names}),
    )


STATE_NODES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3)
                           | _tagged(inner), max_leaves=15)


@FUZZ
@given(tree=st.dictionaries(st.text(max_size=5), STATE_NODES, max_size=4),
       refs=st.none() | JSON_VALUES | st.dictionaries(st.sampled_from(["w", "x"]), st.lists(
           st.sampled_from([1, 2, -1, "1", "nope.safetensors", "../x", "w", "b"]),
           max_size=4), max_size=2),
       damage=st.sampled_from(["none", "truncate", "nest", "not-an-object"]))
def test_fuzz_state_trees(template, tree, refs, damage):
    def plant(case):
        doc = {"tree": tree} if refs is None else {"tree": tree, "tensor_refs": refs}
        raw = json.dumps(doc).encode()
        if damage == "truncate":
            raw = raw[: len(raw) // 2]
        elif damage == "nest":
            raw = b'{"tree": {"x": ' + b"[" * 3000 + b"]" * 3000 + b"}}"
        elif damage == "not-an-object":
            raw = json.dumps([tree]).encode()
        case.rewrite(case.member("state"), raw)

    run_case("state", template, plant)


def _values(leaves):
    tensors = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool,
                               torch.uint8]).flatmap(lambda dtype: st.integers(0, 5).map(
                                   lambda n: (torch.arange(n) % 2).to(dtype)))
    arrays = st.sampled_from(["<i4", "<f8", "|u1", "?", "<M8[s]", "<U3", "<c8"]).flatmap(
        lambda dt: st.integers(0, 4).map(lambda n: np.zeros((n, 2), dtype=dt)))
    keys = st.integers(-5, 5) | st.tuples(st.integers(0, 3), st.text(max_size=3))
    return st.recursive(
        leaves | tensors | arrays | st.sampled_from(sorted(DTYPES.values(), key=str)),
        lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        | st.dictionaries(keys, inner, min_size=1, max_size=3), max_leaves=10)


VALUE_LEAVES = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1)
                | st.floats(allow_nan=False) | st.text(max_size=10) | st.binary(max_size=8))


@FUZZ
@given(extra=st.dictionaries(st.text(max_size=6), _values(VALUE_LEAVES), max_size=3))
def test_fuzz_valid_states_round_trip(template, extra):
    """Whatever a save accepts, restore gives back equal (the validator is not too strict)."""
    saved = {**_state(2), "extra": extra}

    def plant(case):
        for path in case.step2.iterdir():
            path.unlink()
        case.step2.rmdir()
        mgr = CheckpointManager(case.run)
        mgr.save(2, saved, blocking=True)
        mgr.close()

    case = Case(template)
    try:
        plant(case)
        with guarded_case("state-valid", case.root, case.run) as outside:
            assert check_readers(case, expect=2) == 2
            target: dict = {}
            CheckpointManager(case.run).restore(target)
            assert _same(target, saved)
        assert outside == [], outside
    finally:
        case.close()


# -- safetensors -----------------------------------------------------------------------------

_SIZES = {code: torch.empty((), dtype=dtype).element_size() for code, dtype in _CODES.items()}


@st.composite
def tilings(draw):
    """A valid header and data: tensors of known dtypes laid end to end in random order."""
    count = draw(st.integers(0, 4))
    specs = []
    for i in range(count):
        code = draw(st.sampled_from(sorted(_CODES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        specs.append((f"t{i}", code, shape))
    order = draw(st.permutations(range(count)))
    header, offset = {}, 0
    for index in order:
        name, code, shape = specs[index]
        nbytes = int(np.prod(shape, dtype=np.int64)) * _SIZES[code]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, draw(st.binary(min_size=offset, max_size=offset))


def _file(header: dict, data: bytes, *, length_delta: int = 0) -> bytes:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", max(0, len(body) + length_delta)) + body + data


@st.composite
def mutated_files(draw):
    header, data = draw(tilings())
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["shift", "dtype", "shape", "offsets", "metadata", "length",
                                 "truncate", "flip", "extra-data", "duplicate"]))
    delta = 0
    if kind in ("shift", "dtype", "shape", "offsets", "duplicate") and names:
        entry = header[draw(st.sampled_from(names))]
        if kind == "shift":
            entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
        elif kind == "dtype":
            entry["dtype"] = draw(st.sampled_from(sorted(_CODES) + ["F99", "", 5]))
        elif kind == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 5), max_size=3) | JSON_VALUES)
        elif kind == "offsets":
            entry["data_offsets"] = draw(JSON_VALUES)
        else:
            header["copy"] = json.loads(json.dumps(entry))
    elif kind == "metadata":
        header["__metadata__"] = draw(JSON_VALUES)
    elif kind == "length":
        delta = draw(st.integers(-16, 16))
    elif kind == "extra-data":
        data += draw(st.binary(min_size=1, max_size=8))
    raw = bytearray(_file(header, data, length_delta=delta))
    if kind == "truncate":
        del raw[draw(st.integers(0, len(raw))):]
    elif kind == "flip" and raw:
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    return bytes(raw)


def _parsed(raw: bytes):
    try:
        return parse_safetensors(memoryview(bytearray(raw)), "fuzz.safetensors")
    except CheckpointCorrupt:
        return None


def _reference(raw: bytes):
    try:
        return safetensors.torch.load(raw)
    except Exception:  # the reference refusing is all that is asked
        return None


@FUZZ
@given(raw=mutated_files() | tilings().map(lambda hd: _file(*hd)))
def test_fuzz_safetensors_never_more_lenient_than_the_format(raw):
    """What we accept, the safetensors library accepts too, with the same bytes."""
    with guarded_case("safetensors-parse", Path(tempfile.gettempdir()), Path("/nonexistent")):
        ours = _parsed(raw)
        if ours is not None:
            reference = _reference(raw)
            assert reference is not None, "accepted a file the format refuses"
            assert ours.keys() == reference.keys()
            for name, tensor in ours.items():
                assert _same(tensor, reference[name]), name


@FUZZ
@given(tiling=tilings())
def test_fuzz_valid_safetensors_parse(tiling):
    """Any valid tiling parses, to the tensors the reference reads."""
    raw = _file(*tiling)
    with guarded_case("safetensors-valid", Path(tempfile.gettempdir()), Path("/nonexistent")):
        ours = _parsed(raw)
        assert ours is not None
        reference = safetensors.torch.load(raw)
        assert ours.keys() == reference.keys()
        assert all(_same(t, reference[n]) for n, t in ours.items())


@FUZZ
@given(raw=mutated_files())
def test_fuzz_shards_in_a_run(template, raw):
    def plant(case):
        case.rewrite(case.member("tensors"), raw)

    run_case("shard", template, plant)


# -- planted files ----------------------------------------------------------------------------

@FUZZ
@given(which=st.sampled_from(["manifest", "state", "tensors"]),
       kind=st.sampled_from(["link-to-copy", "dangling-link", "fifo", "directory"]))
def test_fuzz_planted_files(template, which, kind):
    """A link (even to a byte-identical copy), FIFO or directory in place of a file of
    step 2: refused, never followed, never waited on."""
    def plant(case):
        victim = case.step2 / MANIFEST if which == "manifest" else case.member(which)
        copy = case.root / "outside" / victim.name
        shutil.copy(victim, copy)
        victim.unlink()
        if kind == "link-to-copy":
            victim.symlink_to(copy)
        elif kind == "dangling-link":
            victim.symlink_to(case.root / "outside" / "nothing")
        elif kind == "fifo":
            os.mkfifo(victim)
        else:
            victim.mkdir()

    run_case("planted", template, plant, expect=1)
