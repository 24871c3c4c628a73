"""WriteGate: one warning per full-disk episode, probes at growing intervals, no flapping."""

from __future__ import annotations

import errno
import logging

from tcmu_obd.cache.fileio import WriteGate

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "cannot be written" in r.getMessage()]


def test_closed_gate_lets_one_probe_through_at_growing_intervals(caplog):
    clock = Clock()
    gate = WriteGate("cachedir", retry_after=0.5, max_retry_after=2.0, clock=clock)
    assert gate.is_open and not gate.closed
    gate.failed(ENOSPC)
    assert gate.closed and not gate.is_open and gate.episodes == 1
    clock.t += 0.5
    assert gate.is_open  # time for a probe
    gate.failed(ENOSPC)
    clock.t += 0.5
    assert not gate.is_open  # backed off to 1 s
    clock.t += 0.5
    assert gate.is_open
    for _ in range(5):
        gate.failed(ENOSPC)
    clock.t += 2.0
    assert gate.is_open  # capped at max_retry_after
    assert len(warnings(caplog)) == 1


def test_a_failure_right_after_reopening_is_the_same_episode(caplog):
    clock = Clock()
    gate = WriteGate("cachedir", retry_after=0.5, clock=clock)
    gate.failed(ENOSPC)
    clock.t += 0.5
    gate.succeeded()  # a probe landed in blocks an earlier short write had allocated...
    assert not gate.closed
    clock.t += 0.1
    gate.failed(ENOSPC)  # ...and the next write is refused again
    assert gate.closed and gate.episodes == 1
    assert len(warnings(caplog)) == 1
    clock.t += gate.flap_window + gate.max_retry_after
    gate.succeeded()
    clock.t += gate.flap_window + 1  # a real new episode, long after: warned again
    gate.failed(ENOSPC)
    assert gate.episodes == 2 and len(warnings(caplog)) == 2
