"""Reading a local job's attempt logs: the last N lines, and what was written since T."""

from __future__ import annotations

import pytest

from trainguard.launch.logs import LogClock, offset_of_tail, offset_since, start_offset


@pytest.mark.parametrize("text", ["a\nb\nc\n", "a\nb\nc", "", "\n\n", "x" * 200_000 + "\ny\n",
                                  "one long line without an end" * 5000])
def test_tail_is_the_last_n_lines_as_splitlines_sees_them(tmp_path, text):
    path = tmp_path / "attempt-1.log"
    path.write_text(text)
    for n in range(5):
        want = "".join(text.splitlines(keepends=True)[-n:]) if n else ""
        assert text[offset_of_tail(path, n):] == want


def test_since_starts_at_the_first_line_not_yet_written_at_the_last_note_before(tmp_path):
    path = tmp_path / "attempt-1.log"
    now = [100.0]
    clock = LogClock(path, clock=lambda: now[0])
    for line in ("one\n", "two\n", "thr", "ee\n"):  # a line torn across two notes
        with open(path, "a") as out:
            out.write(line)
        clock.tick()
        clock.tick()  # an unchanged size notes nothing
        now[0] += 100
    text = path.read_text()
    assert len((tmp_path / "attempt-1.times").read_text().splitlines()) == 4
    assert text[offset_since(path, 50)] == "o"  # everything
    assert text[offset_since(path, 150):] == "two\nthree\n"
    assert text[offset_since(path, 350):] == "three\n"  # the whole torn line, not "ee"
    assert offset_since(path, 450) is None  # nothing since
    assert text[start_offset(path, tail=1, since=150):] == "three\n"
    assert start_offset(tmp_path / "missing.log", tail=3, since=1.0) == 0
