"""common.Progress: a line a second on a terminal, one every 10 s in a log (not a terminal), a final line
at close. A fake clock drives it, so the tests take no time and count lines exactly."""

import io

import pytest

import scratchllm.common as common
from scratchllm.common import Progress


class FakeTime:
    """Stands in for the `time` module inside common.py: perf_counter() returns `now`."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture()
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(common, "time", fake)
    return fake


def run(clock, steps, dt, stream=None, **kwargs):
    """`steps` updates `dt` seconds apart, then close; the lines printed."""
    p = Progress(total=steps, unit="steps", desc="train", stream=stream, **kwargs)
    for _ in range(steps):
        clock.now += dt  # dt a power of two: the sums are exact, so are the line counts
        p.update(1, loss=1.5)
    p.close()
    return stream.getvalue().splitlines() if stream is not None else None


def test_a_log_gets_a_line_every_ten_seconds(clock):
    lines = run(clock, 1500, 0.25, io.StringIO())  # the demo: 1500 steps in 375 s
    assert len(lines) == 37 + 1  # at 10 s, 20 s, ..., 370 s, and the final line
    assert lines[0].startswith("train | 40/1500 | 4.0 steps/s | ETA 6m05s | loss 1.5")
    assert lines[-1].startswith("train | 1500/1500 | 4.0 steps/s | ETA 0s")


def test_rapid_updates_to_stderr_in_a_log_are_a_few_lines(clock, capsys):
    run(clock, 12_288, 2**-10)  # 12 s; stderr under pytest's capture is not a terminal
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[-1].startswith("train | 12288/12288")  # the 10 s line and the final one
    run(clock, 9_216, 2**-10)  # 9 s: never long enough to print, so no final line either
    assert capsys.readouterr().err == ""


def test_a_terminal_still_gets_a_line_a_second(clock):
    lines = run(clock, 1500, 0.25, Terminal())
    assert len(lines) == 375 + 1
    assert run(clock, 1500, 0.25, Terminal(), enabled=False) == []


def test_log_every_is_a_setting(clock):
    assert len(run(clock, 1500, 0.25, io.StringIO(), log_every=60)) == 6 + 1
    assert len(run(clock, 1500, 0.25, io.StringIO(), every=100)) == 3 + 1  # the larger of the two wins
