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


class LinkSim:
    def __init__(self, window, *, capacity=50 * MB, rtt=0.2, stream_cap=17 * MB, chunk=2 * MiB, dt=0.002):
        self.w, self.capacity, self.rtt, self.stream_cap, self.chunk, self.dt = (
            window, capacity, rtt, stream_cap, chunk, dt)
        self.t = 0.0
        self.active: list[list[float]] = []  # [sent_at, bytes_left, first byte after]
        self.done: list[tuple[float, float]] = []  # (t, latency)
        self.delivered: list[tuple[float, int]] = []
        self.windows: list[tuple[float, int]] = []
        self.rnd = random.Random(1)  # per-request jitter: real flows drift apart

    def run(self, until, fg_every=None):
        fg_next = fg_every
        while self.t < until:
            while self.w.can_start(self.chunk):
                self.w.on_start(self.t, self.chunk)
                self.active.append([self.t, float(self.chunk), self.rtt * self.rnd.uniform(0.95, 1.15)])
            flowing = [r for r in self.active if self.t - r[0] >= r[2]]
            if flowing:
                share = min(self.stream_cap, self.capacity / len(flowing)) * self.dt
                for r in flowing:
                    r[1] -= share
            for r in [r for r in self.active if r[1] <= 0]:
                self.active.remove(r)
                lat = self.t - r[0]
                self.w.on_complete(self.t, self.chunk, lat)
                self.done.append((self.t, lat))
                self.delivered.append((self.t, self.chunk))
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
