"""SchedulerOptions: the scheduler's knobs, plain data (docs/scheduler.md).

Its own module, light to import: `fetch` reads how many connections the first burst needs from
it before it loads the HTTP client and the scheduler (tools/fetch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .control import AdaptiveWindow, FixedWindow

MiB = 1 << 20


@dataclass
class SchedulerOptions:
    """Knobs (docs/scheduler.md). mode: "adaptive" (default), "fixed" (fixed_concurrency
    requests of fill_chunk), "upstream" (one download.blockSize request at a time, like
    upstream's bk_download)."""

    mode: str = "adaptive"
    # bytes per fill request. None: adaptive mode sizes it from the link (AdaptiveWindow
    # auto_chunk: start at `initial_chunk`, then ~BDP within [min_chunk, max_chunk]);
    # fixed mode uses 4 MiB.
    fill_chunk: int | None = None
    initial_chunk: int = 1 * MiB
    # Requests in flight when a fill starts. Each request rides its own connection in TCP slow
    # start, so more of them reach the link's rate sooner; a daemon keeps this small so device
    # reads are not queued behind the first burst, `fetch` (nothing to protect) starts wide.
    initial_requests: int = 8
    # Spread the first burst's request sizes (see Scheduler._staggered). `fetch` turns it on:
    # the link is all its own. Off in a daemon, where it made the fill faster at the price of
    # cold device reads (p90 1.32-1.52x the idle link's instead of 1.09-1.36x on the 200 ms rig).
    stagger_first_burst: bool = False
    # What the adaptive window's STEADY state reads as queueing (AdaptiveWindow queue_signal):
    # "request" (default: whole-request latency, which also keeps few fill flows beside device
    # reads) or "first_byte" (`fetch`: only the queue in front of the bottleneck shrinks it).
    queue_signal: str = "request"
    # adaptive request size (no fill_chunk): a power of two near this fraction of the link's
    # bandwidth-delay product (AdaptiveWindow chunk_bdp_fraction). `fetch` uses 0.1: on the
    # 200 ms / 50 MB/s rig 1 MiB requests (~40-64 in flight) filled a 1 GiB layer at 43-45
    # MB/s where 4 MiB ones (16 in flight) managed 39-43 (each connection idles a round trip
    # between its responses, so more, smaller requests keep the link fuller).
    chunk_bdp_fraction: float = 1.0
    min_chunk: int = 256 * 1024
    max_chunk: int = 4 * MiB
    max_concurrency: int = 64
    max_inflight_bytes: int = 256 * MiB
    fixed_concurrency: int = 16
    fg_yield: float = 0.75
    fg_attempts: int = 3
    # A fill gives up on transient failures (connection refused, 5xx, timeouts) only after
    # tryCnt consecutive failed rounds *and* this many seconds of failing: a registry that is
    # away for a minute or two (restart, failover) must not end the fill for good.
    fill_outage_grace: float = 300.0
    # fill endgame: request a straggler's back half again only if that saves this many seconds
    hedge_min_gain: float = 0.5
    max_mbps: float | None = None  # None: from download.maxMBps
    # latency_probes: the adaptive window drains the pipe to measure its latency floor (BBR's
    # Drain and ProbeRTT; AdaptiveWindow(latency_probes=True)). Off by default: the floor is estimated
    # instead, and each probe idled the link for a round trip or more (on the 200 ms rig: the
    # filler beside device reads went from 30.5 to 37.5 MB/s with their p90 within 1.1-1.4x of
    # an idle link's either way; docs/scheduler.md)
    latency_probes: bool = False

    def make_window(self, block_size: int):
        if self.mode == "upstream":
            return FixedWindow(1)
        if self.mode == "fixed":
            return FixedWindow(self.fixed_concurrency, self.max_inflight_bytes)
        if self.mode != "adaptive":
            raise ValueError(f"unknown scheduler mode {self.mode!r}")
        if self.fill_chunk is None:
            return AdaptiveWindow(
                self.initial_chunk, max_bytes=self.max_inflight_bytes, max_requests=self.max_concurrency,
                auto_chunk=True, min_chunk=self.min_chunk, max_chunk=self.max_chunk,
                initial_bytes=self.initial_requests * self.initial_chunk, latency_probes=self.latency_probes,
                queue_signal=self.queue_signal, chunk_bdp_fraction=self.chunk_bdp_fraction,
            )
        return AdaptiveWindow(
            self.fill_chunk, max_bytes=self.max_inflight_bytes, max_requests=self.max_concurrency,
            initial_bytes=self.initial_requests * self.fill_chunk, latency_probes=self.latency_probes,
            queue_signal=self.queue_signal,
        )

    @property
    def first_burst(self) -> int:
        """Fill requests sent together when a fill starts (each needs a connection)."""
        n = {"upstream": 1, "fixed": self.fixed_concurrency}.get(self.mode, self.initial_requests)
        return max(1, min(n, self.max_concurrency))

    @property
    def fixed_chunk(self) -> int:
        return self.fill_chunk if self.fill_chunk is not None else 4 * MiB


def foreground_reserve(pool: int) -> int:
    """Connections of an HTTP pool of `pool` the background may not use, so a foreground read
    never queues for a connection behind the fill (Scheduler.__init__)."""
    return max(4, pool // 8)


def pool_for(background_requests: int) -> int:
    """The smallest connection pool that leaves `background_requests` to the background."""
    pool = background_requests + 4
    while pool - foreground_reserve(pool) < background_requests:
        pool += 1
    return pool
