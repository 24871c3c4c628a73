"""Window controller and token bucket, driven in virtual time (no sleeps, no wall clock).

LinkSim is a fluid model of a long fat link: a request's data starts flowing one RTT (plus a
little seeded jitter: server time, so flows drift apart as real ones do) after it is sent; flowing requests share `capacity` equally, each capped at `stream_cap` (TCP's
per-stream window limit at that RTT, link-rig.md). Past the bandwidth-delay product, more
requests only stretch every request's latency — exactly the queueing the controller must
avoid while keeping the link full.
"""

from __future__ import annotations

import random
import statistics

import pytest

from tcmu_obd.scheduler import AdaptiveWindow, FixedWindow, TokenBucket, WindowState

MB = 1e6
MiB = 1 << 20
KiB = 1 << 10


class LinkSim:
    def __init__(self, window, *, capacity=50 * MB, rtt=0.2, stream_cap=17 * MB, chunk=2 * MiB, dt=0.002,
                 follow_chunk=False):
        # follow_chunk: requests are window.chunk bytes (auto_chunk) and completions report
        # their time to first byte, as the scheduler does with a progressive fetcher
        self.w, self.capacity, self.rtt, self.stream_cap, self.chunk, self.dt = (
            window, capacity, rtt, stream_cap, chunk, dt)
        self.follow = follow_chunk
        self.scale = 1.0  # the scheduler's fg_yield: admit against window × scale
        self.sizes: list[tuple[float, int]] = []
        self.t = 0.0
        self.active: list[list[float]] = []  # [sent_at, bytes_left, first byte after]
        self.done: list[tuple[float, float]] = []  # (t, latency)
        self.delivered: list[tuple[float, int]] = []
        self.windows: list[tuple[float, int]] = []
        self.rnd = random.Random(1)  # per-request jitter: real flows drift apart

    def run(self, until, fg_every=None):
        fg_next = fg_every
        while self.t < until:
            while self.w.can_start(self.w.chunk if self.follow else self.chunk, self.scale):
                size = self.w.chunk if self.follow else self.chunk
                self.w.on_start(self.t, size)
                self.sizes.append((self.t, size))
                self.active.append([self.t, float(size), self.rtt * self.rnd.uniform(0.95, 1.15), size])
            flowing = [r for r in self.active if self.t - r[0] >= r[2]]
            if flowing:
                share = min(self.stream_cap, self.capacity / len(flowing)) * self.dt
                for r in flowing:
                    r[1] -= share
            for r in [r for r in self.active if r[1] <= 0]:
                self.active.remove(r)
                lat = self.t - r[0]
                if self.follow:
                    self.w.on_complete(self.t, r[3], lat, ttfb=r[2])
                else:
                    self.w.on_complete(self.t, r[3], lat)
                self.done.append((self.t, lat))
                self.delivered.append((self.t, r[3]))
            if fg_next is not None and self.t >= fg_next:
                # a small foreground request: one RTT plus its share of the link
                n = len(flowing) + 1
                self.w.on_foreground(self.t, 4096, self.rtt + 4096 / (self.capacity / n))
                fg_next += fg_every
            self.windows.append((self.t, self.w.window_bytes))
            self.t += self.dt

    def rate(self, t0, t1):
        return sum(n for t, n in self.delivered if t0 <= t < t1) / (t1 - t0)

    def latency(self, t0, t1):
        return statistics.median(l for t, l in self.done if t0 <= t < t1)

    def window_at(self, t):
        return next(w for tt, w in self.windows if tt >= t)


BASE = 0.2 + 2 * MiB / (17 * MB)  # latency of a chunk through an empty link


def test_window_grows_until_the_link_is_full_and_keeps_the_queue_short():
    w = AdaptiveWindow(2 * MiB)
    start = w.window_bytes
    sim = LinkSim(w)
    sim.run(30.0)
    assert w.state is WindowState.STEADY
    assert w.window_bytes > start
    assert sim.rate(10, 30) >= 0.85 * 50 * MB  # link (nearly) full: upstream's pattern gets ~2 %
    assert sim.latency(10, 30) <= 2.0 * BASE  # but not by queueing: latency near the floor
    assert w.window_bytes <= 40 * MiB  # ≈ 1.5 × rate × floor, not max_bytes


def test_window_backs_off_when_capacity_drops():
    w = AdaptiveWindow(2 * MiB)
    sim = LinkSim(w)
    sim.run(30.0)
    before = w.window_bytes
    sim.capacity = 20 * MB  # the path narrows: same window now queues
    sim.run(70.0)
    assert w.window_bytes < 0.75 * before
    # (equilibrium latency is gain × floor; in this model that leaves ~10-15 % unused at 20 MB/s)
    assert sim.rate(50, 70) >= 0.8 * 20 * MB
    assert sim.latency(50, 70) <= 2.2 * BASE


def test_small_uncongested_link_stays_small():
    """A link whose BDP is a couple of chunks must not be flooded with 64 requests."""
    w = AdaptiveWindow(2 * MiB)
    sim = LinkSim(w, capacity=10 * MB, rtt=0.05)
    sim.run(30.0)
    assert w.window_bytes <= 8 * 2 * MiB
    assert sim.rate(10, 30) >= 0.9 * 10 * MB


def test_foreground_latency_inflation_shrinks_the_window():
    w = AdaptiveWindow(2 * MiB, initial_bytes=40 * 2 * MiB)
    w.state = WindowState.STEADY
    w.on_foreground(0.0, 4096, 0.2)
    w.on_start(0.0, 2 * MiB)
    before = w.window_bytes
    w.on_foreground(0.1, 4096, 0.9)  # 4.5× the best: background is queueing in front
    assert w.window_bytes == int(before * 0.7)
    w.on_foreground(0.2, 4096, 0.9)  # at most once per round
    assert w.window_bytes == int(before * 0.7)


def test_foreground_queueing_is_read_from_time_to_first_byte_when_known():
    w = AdaptiveWindow(2 * MiB, initial_bytes=40 * 2 * MiB)
    w.state = WindowState.STEADY
    w.on_foreground(0.0, 8 * KiB, 0.21, ttfb=0.2)  # a few KiB from the reader's page
    w.on_start(0.0, 2 * MiB)
    before = w.window_bytes
    # a whole refill unit behind a flow's share of the link: long, but nothing queued in front
    w.on_foreground(0.1, 256 * KiB, 0.7, ttfb=0.22)
    assert w.window_bytes == before
    w.on_foreground(0.2, 8 * KiB, 0.71, ttfb=0.7)  # its first byte 3.5× late: a queue in front
    assert w.window_bytes == int(before * 0.7)


def test_upper_bounds_hold():
    w = AdaptiveWindow(2 * MiB, max_requests=8, max_bytes=12 * MiB)
    sim = LinkSim(w, capacity=1000 * MB, rtt=0.2, stream_cap=17 * MB)
    sim.run(10.0)
    assert max(n for _, n in sim.windows) <= 12 * MiB
    assert w.inflight_requests <= 8


def test_fixed_window_counts_requests():
    w = FixedWindow(2)
    assert w.can_start(10)
    w.on_start(0, 10)
    w.on_start(0, 10)
    assert not w.can_start(10)
    w.on_complete(1, 10, 1.0)
    assert w.can_start(10) and w.inflight_bytes == 10


@pytest.mark.parametrize("rate", [MiB, 10 * MiB])
def test_token_bucket_counts_bytes(rate):
    b = TokenBucket(rate, burst=rate, now=0.0)
    assert b.reserve(rate, 0.0) == 0.0  # the initial burst
    assert b.reserve(rate // 2, 0.0) == pytest.approx(0.5)  # owes half a second
    assert b.tokens == -rate // 2
    assert b.reserve(0, 0.5) == 0.0  # paid back exactly
    assert b.tokens == pytest.approx(0)
    # over 100 s of virtual time, total admitted bytes never exceed burst + rate × t
    t, admitted = 0.0, 0
    for _ in range(1000):
        wait = b.reserve(rate // 7, t)
        t += wait
        admitted += rate // 7
        assert admitted <= rate + rate // 2 + rate * t + 1
    assert b.taken == rate + rate // 2 + admitted


def test_token_bucket_unlimited_and_refund():
    b = TokenBucket(0)
    assert b.unlimited and b.reserve(1 << 40, 0.0) == 0.0
    b2 = TokenBucket(100, burst=100, now=0)
    b2.reserve(100, 0)
    b2.refund(50)
    assert b2.tokens == 50 and b2.taken == 50


def test_adaptive_beats_upstream_pattern_by_far_on_a_long_link():
    """Same model, upstream's bk_download pattern: one 256 KiB request at a time."""
    up = LinkSim(FixedWindow(1), chunk=256 * 1024)
    up.run(20.0)
    ad = LinkSim(AdaptiveWindow(4 * MiB), chunk=4 * MiB)
    ad.run(20.0)
    assert up.rate(5, 20) < 0.03 * 50 * MB  # ~1-2 % of the link, as measured on the rig
    assert ad.rate(5, 20) > 25 * up.rate(5, 20)


# --- link-sized requests (auto_chunk) ----------------------------------------------------------


def _auto(**kw):
    return AdaptiveWindow(1 * MiB, auto_chunk=True, **kw)


def test_auto_chunk_starts_small_and_settles_near_the_bdp_on_a_slow_link():
    """The demo's link: 6.25 MB/s, 200 ms (BDP 1.25 MB). 4 MiB requests and a 2 × 4 MiB
    minimum window were ~30 × the BDP; now requests are ~1 BDP and few are in flight."""
    w = _auto()
    assert w.window_bytes == 8 * MiB and w.min_bytes == 1 * MiB  # 8 × 1 MiB at first
    sim = LinkSim(w, capacity=6.25 * MB, rtt=0.2, stream_cap=100 * MB, follow_chunk=True)
    sim.run(40.0)
    assert w.state is WindowState.STEADY
    assert w.chunk == 1 * MiB  # 2^round(log2(6.25 MB × 0.2 s))
    assert w.min_bytes == w.chunk  # a fraction of the BDP, not 2 × 4 MiB
    assert sim.rate(20, 40) >= 0.85 * 6.25 * MB
    # bytes in flight stay around 3 BDP (3-4 requests), so a foreground request shares the
    # link with a few flows (the old 4 MiB requests never went below 8 MiB: 6.7 BDP, and the
    # demo ran at 38 MiB)
    late = [n for t, n in sim.windows if t >= 20]
    assert sum(late) / len(late) <= 3.25 * 1.25 * MB and max(late) <= 5 * 1.25 * MB
    assert sim.latency(20, 40) <= 0.2 + 4 * 1.25 * MB / (6.25 * MB)


def test_auto_chunk_grows_requests_on_a_fat_link_and_fills_it():
    """The rig's link: 50 MB/s, 200 ms, ~12-17 MB/s per stream: requests grow to 4 MiB."""
    w = _auto()
    sim = LinkSim(w, capacity=50 * MB, rtt=0.2, stream_cap=17 * MB, follow_chunk=True)
    sim.run(40.0)
    assert w.chunk == 4 * MiB
    assert sim.rate(15, 40) >= 0.85 * 50 * MB
    assert [s for t, s in sim.sizes[:8]] == [1 * MiB] * 8  # it started with 1 MiB requests


def test_auto_chunk_follows_a_capacity_change_with_hysteresis():
    w = _auto()
    sim = LinkSim(w, capacity=50 * MB, rtt=0.2, stream_cap=17 * MB, follow_chunk=True)
    sim.run(30.0)
    assert w.chunk == 4 * MiB
    changes = w.chunk_changes
    sim.run(45.0)
    assert w.chunk_changes == changes  # stable while the link is
    sim.capacity = 6.25 * MB  # the path narrows 8×: requests shrink (BDP ≈ 1.25 MB)
    sim.run(120.0)
    assert w.chunk <= 2 * MiB  # (1.25 MB wanted: within 2× of 2 MiB, so hysteresis keeps it)
    assert sim.rate(100, 120) >= 0.75 * 6.25 * MB


def test_time_to_first_byte_is_the_rtt_estimate():
    w = _auto()
    w.on_start(0.0, MiB)
    w.on_complete(0.5, MiB, 0.5, ttfb=0.21)
    w.on_start(0.5, MiB)
    w.on_complete(1.0, MiB, 0.5, ttfb=0.35)  # a queued sample does not raise the floor
    assert w.rtt == pytest.approx(0.21)


def test_yielding_to_foreground_does_not_ratchet_the_window_down():
    """While device reads run the scheduler admits against half the window (fg_yield); the
    rate measured meanwhile must not be taken for the path's, or a steady stream of device
    reads shrinks the window round after round (seen on the rig: 36 → 25 MB/s)."""
    w = _auto()
    sim = LinkSim(w, capacity=50 * MB, rtt=0.2, stream_cap=17 * MB, follow_chunk=True)
    sim.run(20.0)
    before = w.window_bytes
    sim.scale = 0.5
    w.set_scale(sim.t, 0.5)
    sim.run(60.0)
    assert w.window_bytes >= 0.8 * before
    sim.scale = 1.0
    w.set_scale(sim.t, 1.0)
    sim.run(80.0)
    assert sim.rate(70, 80) >= 0.85 * 50 * MB


@pytest.mark.parametrize("stream_cap", [12 * MB, 17 * MB, 100 * MB])
def test_bulk_window_leaves_startup_without_idling_the_pipe(stream_cap):
    """`fetch` (nothing else on the link): leaving STARTUP without a latency probe keeps the
    link full through the transition, where a probing window idles it for a round trip or
    more; the steady state is as full either way, and the window stays bounded."""
    early, late = {}, {}
    for probes in (True, False):
        w = AdaptiveWindow(1 * MiB, auto_chunk=True, initial_bytes=64 * MiB, latency_probes=probes)
        sim = LinkSim(w, capacity=50 * MB, rtt=0.2, stream_cap=stream_cap, follow_chunk=True)
        sim.run(30.0)
        early[probes], late[probes] = sim.rate(0, 8), sim.rate(10, 30)
        assert w.state is WindowState.STEADY
        if not probes:
            assert w.probes == 0
            assert max(n for _, n in sim.windows) <= 96 * MiB
    assert early[False] > early[True]
    assert late[False] >= 0.92 * 50 * MB


def _steady_rounds(w, rounds, latency, ttfb, t=0.0, requests=8):
    """Drive `rounds` STEADY rounds of `requests` chunk-sized requests, each taking
    `latency(i)` with its first byte after `ttfb(i)` (i: the round)."""
    for i in range(rounds):
        for _ in range(requests):
            w.on_start(t, w.chunk)
        t += latency(i)
        for _ in range(requests):
            w.on_complete(t, w.chunk, latency(i), ttfb=ttfb(i))
        t += 0.01
    return t


@pytest.mark.parametrize("signal", ["request", "first_byte"])
def test_bulk_window_is_not_shrunk_by_requests_that_merely_share_the_link(signal):
    """The spiral seen on the rig: requests got faster as fewer bytes were in flight, the
    chunk floor fell with them, and the request-latency rule cut the window round after
    round. With queue_signal="first_byte" (fetch) only a queue in front of the bottleneck,
    seen in the time to first byte, shrinks it."""
    w = AdaptiveWindow(4 * MiB, initial_bytes=64 * MiB, queue_signal=signal, latency_probes=False)
    w.state = WindowState.STEADY
    t = _steady_rounds(w, 3, lambda i: 1.3, lambda i: 0.21)  # the link full at 64 MiB
    start = w.window_bytes
    # then faster requests now and then (the floor falls), slower ones in between, no queue
    _steady_rounds(w, 30, lambda i: 0.45 if i % 3 == 0 else 1.3, lambda i: 0.21, t)
    if signal == "request":
        assert w.window_bytes <= 0.5 * 64 * MiB  # what fetch used to do
    else:
        assert w.window_bytes == start == 64 * MiB


def test_bulk_window_backs_off_when_first_bytes_queue_and_probes_for_more():
    w = AdaptiveWindow(4 * MiB, initial_bytes=64 * MiB, queue_signal="first_byte", latency_probes=False)
    w.state = WindowState.STEADY
    t = _steady_rounds(w, 2, lambda i: 1.3, lambda i: 0.2, requests=16)
    before = w.window_bytes
    t = _steady_rounds(w, 3, lambda i: 1.3, lambda i: 0.6, t, requests=16)  # first bytes wait 0.4 s in a queue
    t = _steady_rounds(w, 1, lambda i: 1.3, lambda i: 0.2, t, requests=16)  # (a round's verdict lands a round late)
    assert w.window_bytes <= before / 1.25 ** 3
    shrunk = w.window_bytes
    # no queue again, and no rate gain from more in flight: a probe is taken back
    seen = []
    for _ in range(24):
        t = _steady_rounds(w, 1, lambda i: 1.3, lambda i: 0.2, t, requests=16)
        seen.append(w.window_bytes)
    assert max(seen) == int(shrunk * 1.25) and seen[-1] == shrunk
    with pytest.raises(ValueError, match="queue_signal"):
        AdaptiveWindow(queue_signal="loss")
