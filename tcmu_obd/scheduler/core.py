"""Scheduler: the one caller of the registry client. Priorities, in-flight dedup, the filler.

Theory of operation
-------------------
Every byte fetched from a registry goes through a *Transfer*: one range GET of
[start, end) of one blob, written into the blob's cache, then dropped from the blob's
in-flight table. In-flight ranges of the table never overlap, so each byte is fetched at most
once at a time; anyone who needs a byte that is in flight waits for that transfer through a
future of its own (`_waiter`), so one waiter's cancel never cancels the shared fetch.

Progressive transfers: when the fetcher reports body progress (RegistryClient's
`read_range_into(progress=)`), a transfer writes what has arrived to the cache in pieces
(`WRITE_PIECE`, or at once when a waiter needs it), and a waiter wakes as soon as *its*
bytes are in, not when the whole transfer is. One exception to "never overlap": a
foreground read whose bytes a background transfer would deliver later than a fresh GET
takes (`_too_slow`: the transfer's own rate so far vs. the smoothed latency of fresh
foreground GETs) gets its own GET, an *overlay* (RemoteBlob.extra) that other foreground
readers of the range share; the background transfer keeps running.

Three classes, `Priority.FOREGROUND < PREFETCH < FILL`:

* FOREGROUND (a read from a device): planned and started at once, never queued, not counted
  against the background window. The missing pages of the read are widened to `refillSize`
  alignment (as upstream's file cache does); missing runs separated by at most one refill
  unit are coalesced into one GET. While the blob is being filled the GET starts at the
  read's own first page instead (still ending at a unit boundary): the fill brings the head.
  A range already in flight is waited for (until its bytes arrive), not refetched, unless a
  fresh GET would be faster (overlay, above). A PREFETCH transfer still waiting for
  admission is *promoted* instead: it starts at once.
* PREFETCH (trace replay) and FILL (background download) share one window of bytes in
  flight, sized by the controller (AdaptiveWindow, or FixedWindow for `upstream`/fixed
  modes). Waiters are admitted strictly by priority, then arrival; while any foreground
  transfer is running the background window is scaled by `fg_yield`, so the registry link's
  queue drains in favour of the device.
* FILL is driven by one filler task for the whole daemon. It walks the blobs in the order
  their fill started and hands out the next missing, not-in-flight chunk (`fill_chunk`
  bytes, or in adaptive mode by default the window's link-sized `chunk`) whenever the
  window admits one — so concurrency spans chunks, layers and blobs.
  maxMBps is a token bucket on FILL bytes (0 = unthrottled).

Assignment (`_plan`, `_next_fill_chunk`, `_pump_admission`) is synchronous and awaits
nothing; the awaiting happens around it (httpcore's pool pattern). Cancel invariants are
noted where they matter.

Completion: the blob's BlobCache hashes in order as bytes arrive; "verified" resolves
`wait_filled`; "mismatch" (cache already discarded) restarts the fill, up to `tryCnt` times.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import enum
import heapq
import inspect
import itertools
import logging
import mmap
import os
import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Protocol

from ..cache import BlobCache, CacheStore
from ..cache.blob import CacheWriteError
from ..errors import AuthError, ConfigError, DigestMismatch, ImageIOError, ObdError, RemoteError
from ..ops.audit import SLOW_READ_SECONDS, audit
from .control import TokenBucket
from .options import SchedulerOptions, foreground_reserve

log = logging.getLogger(__name__)
MiB = 1 << 20
PAGE = 4096
# a progressive transfer writes what has arrived to the cache in pieces of at least this
# (sooner when a reader waits for it)
WRITE_PIECE = 512 * 1024
# ... or after this long since its last piece, so a process killed mid-fill loses about this
# much of each transfer (plus the cache's commit interval), not up to a whole piece
PIECE_SECONDS = 0.1
# fill endgame: a straggler that awaits less than this is not requested again (the hedge's own
# round trip and GET cost more than the bytes; _hedge_pick's time test decides the rest),
# unless it has stalled mid-body
HEDGE_MIN_BYTES = 64 * 1024
# ... and one awaiting less than two minimum requests only among this many fill transfers (or
# when it stalled while the others kept receiving)
HEDGE_SMALL_MAX_INFLIGHT = 4
# ... and its rate is judged on at least this long (and two round trips) of its body: through a
# local proxy, the first 3.6 KB of a 256 KiB response in 20 ms made it look 1.4 s from done
HEDGE_MIN_RECEIVING = 0.25


def _transfer_buffer(n: int, *, lazy: bool) -> memoryview:
    """A writable buffer of n bytes for one transfer.

    bytearray(n) zero-fills at once. For the first burst of a fill (64 x ~1 MiB of pages the
    process never touched) that was ~45 ms of page faults before the first request could leave,
    so those (lazy=True) are private anonymous mappings: one syscall each, and the kernel
    supplies every page when the response writes it. Later transfers use bytearray: malloc
    hands back memory already faulted in, where a mapping per transfer pays a page fault per
    4 KiB in the event loop and an unmap per transfer (a 256 MiB fetch on the 200 ms rig ran
    ~0.3 s longer with mappings throughout)."""
    if lazy and n >= 256 * 1024:
        return memoryview(mmap.mmap(-1, n))
    return memoryview(bytearray(n))


class Priority(enum.IntEnum):
    FOREGROUND = 0
    PREFETCH = 1
    FILL = 2


class Fetcher(Protocol):
    """What the scheduler needs from the registry client (RegistryClient satisfies it)."""

    async def read_range_into(self, url: str, offset: int, buf: memoryview) -> None: ...

    async def blob_size(self, url: str) -> int: ...


class FillState(enum.Enum):
    IDLE = "idle"
    DELAYED = "delayed"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"


@dataclass
class SchedulerStats:
    """Plain counters for progress displays and tests."""

    bytes_fetched: dict = field(default_factory=lambda: {p: 0 for p in Priority})
    requests: dict = field(default_factory=lambda: {p: 0 for p in Priority})
    failures: dict = field(default_factory=lambda: {p: 0 for p in Priority})
    fg_inflight: int = 0
    fg_latency_buckets: tuple = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
    fg_latency_counts: list = field(default_factory=lambda: [0] * 10)
    started_at: float = field(default_factory=time.monotonic)

    fg_latency_sum: float = 0.0
    # reads (through ensure) that found bytes missing from the cache; hits are counted per
    # blob (RemoteBlob.reads - RemoteBlob.misses). read_wait_*: how long foreground misses
    # waited for the registry, same buckets as fg_latency (ops/ exports both).
    misses: int = 0
    miss_bytes: int = 0
    read_wait_counts: list = field(default_factory=lambda: [0] * 10)
    read_wait_sum: float = 0.0
    slow_reads: int = 0
    hedges: int = 0  # fill endgame: straggling transfers whose back half was requested again
    hedged_bytes: int = 0  # ... and the bytes those requests asked for (fetched twice if both land)

    def observe_fg(self, latency: float) -> None:
        self.fg_latency_sum += latency
        for i, b in enumerate(self.fg_latency_buckets):
            if latency <= b:
                self.fg_latency_counts[i] += 1
                return

    def observe_wait(self, seconds: float) -> None:
        self.read_wait_sum += seconds
        for i, b in enumerate(self.fg_latency_buckets):
            if seconds <= b:
                self.read_wait_counts[i] += 1
                return

    @property
    def total_fetched(self) -> int:
        return sum(self.bytes_fetched.values())


class Transfer:
    """One range GET in flight (or, for PREFETCH, waiting for admission).

    Progress (fetchers that report it): `received` bytes of the body are in `buf`;
    [start, `written`) is already in the cache. Waiters register (need_end, future) and are
    woken when `written` reaches need_end, or when the transfer ends (the future's result is
    then the transfer's exception or None). `overlay`: a foreground GET that overlaps a
    slow background transfer (kept in RemoteBlob.extra, not in the disjoint table).
    """

    __slots__ = ("blob", "start", "end", "priority", "task", "admit", "counted", "queued_at", "sent_at",
                 "first_byte_at", "received", "written", "waiters", "wake", "overlay", "hedged", "piece_at",
                 "progress_at", "__weakref__")

    def __init__(self, blob: "RemoteBlob", start: int, end: int, priority: Priority):
        self.blob, self.start, self.end, self.priority = blob, start, end, priority
        self.task: asyncio.Task | None = None
        self.admit: asyncio.Future | None = None  # set while waiting for the background window
        self.counted = False  # counted in the background window
        self.queued_at = 0.0
        self.sent_at: float | None = None
        self.first_byte_at: float | None = None
        self.received = 0
        self.written = start
        self.piece_at = 0.0  # when the last piece was written (or the first byte came)
        self.progress_at = 0.0  # when the last bytes came
        self.waiters: list[tuple[int, asyncio.Future]] = []
        self.wake: asyncio.Future | None = None
        self.overlay = False
        self.hedged = False  # the back part of its range was requested again (fill endgame)

    @property
    def arrived(self) -> int:
        """The blob offset up to which the body has arrived ([start, arrived) is in `buf`)."""
        return self.start + self.received

    @property
    def awaited(self) -> int:
        """Bytes of the range still to arrive."""
        return self.end - self.arrived

    def __repr__(self) -> str:
        state = "queued" if self.admit is not None and not self.admit.done() else "active"
        return f"<Transfer {self.blob.digest[7:19]} [{self.start}, {self.end}) {self.priority.name} {state}>"


class RemoteBlob:
    """Scheduler-side state of one blob: its cache, its in-flight table, its fill."""

    def __init__(self, key, url: str, digest: str, size: int, cache: BlobCache):
        self.key, self.url, self.digest, self.size, self.cache = key, url, digest, size, cache
        self.refs = 0
        self._starts: list[int] = []  # sorted starts of in-flight transfers
        self._by_start: dict[int, Transfer] = {}
        self.extra: list[Transfer] = []  # foreground overlays (may overlap the table)
        self.fill_state = FillState.IDLE
        self.fill_cursor = 0
        self.fill_errors = 0
        self.fill_failing_since = 0.0  # when the current streak of failed rounds began
        self.fill_attempts = 0
        self.fill_paused_until = 0.0
        self.fill_error: BaseException | None = None
        self.try_cnt = 5
        self.fill_done: asyncio.Future | None = None
        self.delay_task: asyncio.Task | None = None
        # observability (ops/): reads through the cache, misses among them, bytes fetched by priority
        self.reads = 0
        self.read_bytes = 0
        self.misses = 0
        self.miss_bytes = 0
        self.fetched = [0] * len(Priority)
        self.fill_started_at: float | None = None

    # in-flight table (disjoint ranges)
    def add(self, t: Transfer) -> None:
        bisect.insort(self._starts, t.start)
        self._by_start[t.start] = t

    def remove(self, t: Transfer) -> None:
        if self._by_start.get(t.start) is t:
            del self._by_start[t.start]
            i = bisect.bisect_left(self._starts, t.start)
            del self._starts[i]

    def overlapping(self, start: int, end: int) -> list[Transfer]:
        i = bisect.bisect_right(self._starts, start) - 1
        out = []
        i = max(i, 0)
        while i < len(self._starts) and self._starts[i] < end:
            t = self._by_start[self._starts[i]]
            if t.end > start:
                out.append(t)
            i += 1
        return out

    def next_inflight_start(self, pos: int) -> int | None:
        i = bisect.bisect_right(self._starts, pos)
        return self._starts[i] if i < len(self._starts) else None

    @property
    def inflight(self) -> list[Transfer]:
        return [self._by_start[s] for s in self._starts] + list(self.extra)

    def __repr__(self) -> str:
        return f"<RemoteBlob {self.digest[:19]} {self.fill_state.value} {self.cache!r}>"


def _align_down(x: int, a: int) -> int:
    return x - x % a


def _align_up(x: int, a: int) -> int:
    return -(-x // a) * a


_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


def live_schedulers() -> list["Scheduler"]:
    """The process's open schedulers (what ops/ exports; nobody has to hand them over)."""
    return [s for s in list(_LIVE) if not s._closed]


class Scheduler:
    """One per daemon. `fetcher`: RegistryClient (or any Fetcher); `cache`: CacheStore."""

    def __init__(self, fetcher: Fetcher, cache: CacheStore, global_config, options: SchedulerOptions | None = None):
        self.fetcher = fetcher
        self.cache = cache
        self.config = global_config
        self.options = options or SchedulerOptions()
        dl = global_config.download
        self.download = dl
        self.refill = cache.refill_size
        if self.options.mode == "upstream":
            self.fill_chunk = dl.block_size
        else:
            self.fill_chunk = self.options.fixed_chunk
        self.window = self.options.make_window(dl.block_size)
        self._auto_chunk = bool(getattr(self.window, "auto_chunk", False))
        self._fill_launches = 0  # fill requests launched (not hedges): the first burst is staggered
        # does the fetcher report body progress (RegistryClient: read_range_into(progress=))?
        try:
            self._progressive = "progress" in inspect.signature(fetcher.read_range_into).parameters
        except (TypeError, ValueError):
            self._progressive = False
        self._fg_est: float | None = None  # smoothed latency of a fresh refill-sized foreground GET
        self._fill_ttfb: float | None = None  # least time to first byte of a background GET
        self._fill_flow_rate = 0.0  # smoothed body rate of one background GET (bytes/s)
        self.overlays = 0  # foreground GETs that overlapped a slow background transfer
        self.invalidated_bytes = 0  # cached bytes dropped after failing a ZFile CRC (RemoteBlobSource)
        # Foreground must never queue for an HTTP connection behind the fill: keep some of the
        # client's connection pool out of the background's reach.
        pool = getattr(fetcher, "max_connections", None)
        if isinstance(pool, int) and pool > 0:
            self.window.max_requests = min(self.window.max_requests, max(1, pool - foreground_reserve(pool)))
        mbps = self.options.max_mbps if self.options.max_mbps is not None else dl.max_mbps
        rate = mbps * MiB if mbps and mbps > 0 else 0
        self.bucket = TokenBucket(rate, burst=max(rate, self.fill_chunk, self.options.max_chunk) if rate else None,
                                  now=time.monotonic())
        self.stats = SchedulerStats()
        self._blobs: dict[tuple, RemoteBlob] = {}
        self._fill_order: list[RemoteBlob] = []
        self._admission: list = []  # heap of (priority, seq, future, nbytes)
        self._seq = itertools.count()
        self._fg_active = 0
        self._fill_wake = asyncio.Event()
        # set when the first background-fill response starts arriving (fetch starts its side
        # work then: the link is busy and the first requests are out)
        self.fill_receiving = asyncio.Event()
        self._filler: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._owned: list = []  # closed last by aclose (see create())
        self.clock = time.monotonic
        self.slow_read_seconds = SLOW_READ_SECONDS  # a foreground miss waiting longer is audited
        _LIVE.add(self)

    @classmethod
    async def create(cls, global_config, options: SchedulerOptions | None = None) -> "Scheduler":
        """A Scheduler that owns its RegistryClient and CacheStore (closed by `aclose`)."""
        from ..remote.registry import RegistryClient

        opts = options or SchedulerOptions()
        client = RegistryClient(global_config, max_connections=max(64, opts.max_concurrency + 8))
        try:
            store = CacheStore.from_config(global_config)
        except BaseException:
            await client.aclose()
            raise
        s = cls(client, store, global_config, opts)
        s._owned = [store, client]
        return s

    # --- blobs --------------------------------------------------------------------------------
    async def open_blob(self, image_config, lower):
        """A BlobSource for a lower that has no local file (reads go through cache + registry)."""
        from ..remote_source import RemoteBlobSource

        if not lower.digest:
            raise ConfigError(f"{image_config.source}: lower has neither a local file nor a digest")
        if not image_config.repo_blob_url:
            raise ConfigError(f"{image_config.source}: empty repoBlobUrl")
        url = image_config.blob_url(lower.digest)
        b = await self.open_remote(url, lower.digest, lower.size, dir=lower.dir)
        return RemoteBlobSource(self, b)

    async def open_remote(self, url: str, digest: str, size: int = 0, *, dir: str = "") -> RemoteBlob:
        """The shared RemoteBlob for a blob (one reference; `release` it)."""
        key = (digest, os.path.abspath(dir) if dir else "")
        b = self._blobs.get(key)
        if b is None:
            if size <= 0:
                size = await self.fetcher.blob_size(url)
            b = self._blobs.get(key)  # another opener may have won while we asked the registry
        if b is None:
            cache = self.cache.open_blob(digest, size, dir=dir)
            b = RemoteBlob(key, url, digest, size, cache)
            cache.listeners.append(lambda event, b=b: self._on_cache_event(b, event))
            self._blobs[key] = b
        b.refs += 1
        return b

    async def release(self, b: RemoteBlob) -> None:
        b.refs -= 1
        if b.refs > 0:
            return
        self.stop_fill(b)
        for t in b.inflight:
            if t.task is not None:
                t.task.cancel()
        self._blobs.pop(b.key, None)
        await self.cache.release(b.cache)

    @staticmethod
    def _blob_of(obj) -> RemoteBlob:
        return obj if isinstance(obj, RemoteBlob) else obj.blob

    # --- ensure --------------------------------------------------------------------------------
    async def ensure(self, blob, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> None:
        """Return once [offset, offset+length) of `blob` is in the cache.

        Raises RemoteError when the registry keeps failing (after `fg_attempts` tries),
        ImageIOError when the cache file cannot be written.
        """
        b = self._blob_of(blob)
        end = min(offset + length, b.size)
        if b.cache.is_present(offset, end):
            return
        b.misses += 1
        b.miss_bytes += end - offset
        self.stats.misses += 1
        self.stats.miss_bytes += end - offset
        if priority != Priority.FOREGROUND:
            return await self._ensure(b, offset, end, priority)
        started = self.clock()
        try:
            await self._ensure(b, offset, end, priority)
        finally:
            waited = self.clock() - started
            self.stats.observe_wait(waited)
            if waited >= self.slow_read_seconds:
                self.stats.slow_reads += 1
                audit("slow_read", digest=b.digest, offset=offset, length=end - offset, seconds=waited)

    async def _ensure(self, b: RemoteBlob, offset: int, end: int, priority: Priority) -> None:
        failures = 0
        while not b.cache.is_present(offset, end):
            if b.cache.closed or self._closed:
                raise ImageIOError(f"{b.digest}: blob closed", errno.EBADF)
            waits, on_background = self._plan(b, offset, end, Priority(priority))
            if not waits:
                await asyncio.sleep(0)  # only possible if the range became present meanwhile
                continue
            # Cancel invariant: the futures are this waiter's own; cancelling them (or us)
            # never cancels a shared transfer.
            # Waiting on a background transfer: look again after about what a fresh request
            # would take, so a stalled one does not hold a device read (see _plan).
            timeout = self._fg_est if (on_background and self._fg_est) else None
            try:
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in waits:
                    f.cancel()
            errors = [f.result() for f in done if not f.cancelled() and isinstance(f.result(), BaseException)]
            if errors and not b.cache.is_present(offset, end):
                failures += 1
                if failures >= max(1, self.options.fg_attempts):
                    err = next((e for e in errors if isinstance(e, ObdError)), errors[0])
                    if isinstance(err, asyncio.CancelledError):
                        raise RemoteError(f"{b.url}: transfer cancelled", url=b.url)
                    raise err

    def _plan(self, b: RemoteBlob, start: int, end: int, priority: Priority) -> tuple[list[asyncio.Future], bool]:
        """Sync: start what is missing in [start, end) (refill-aligned). Returns waiter futures
        for the transfers that carry [start, end), and whether one of them is background."""
        r = self.refill
        a0, a1 = _align_down(start, r), min(_align_up(end, r), b.size)
        runs = b.cache.missing_runs(a0, a1)
        merged: list[list[int]] = []
        for s, e in runs:  # coalesce runs separated by at most one refill unit
            if merged and s - merged[-1][1] <= r:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        need_start, need_end = _align_down(start, PAGE), min(_align_up(end, PAGE), b.size)
        carriers: list[Transfer] = []
        now = self.clock()
        for s, e in merged:
            pos = s
            while pos < e:
                ov = next((t for t in b.extra if t.start <= pos < t.end), None)
                if ov is not None:
                    carriers.append(ov)
                    pos = ov.end
                    continue
                over = b.overlapping(pos, pos + 1)
                nxt_ov = min((t.start for t in b.extra if t.start > pos), default=e)
                if over:
                    t = over[0]
                    if priority < t.priority and t.admit is not None and not t.admit.done():
                        self._promote(t, priority)
                    stop = min(e, t.end)
                    if (priority == Priority.FOREGROUND and t.priority != Priority.FOREGROUND
                            and pos < end and self._too_slow(t, min(stop, need_end), now)):
                        # a fresh GET beats waiting for this background transfer's bytes:
                        # fetch them alongside (the duplicate bytes are the price)
                        stop = min(stop, nxt_ov)
                        carriers.append(self._launch(b, pos, stop, priority, overlay=True))
                        self.overlays += 1
                        pos = stop
                        continue
                    carriers.append(t)
                    pos = t.end
                    continue
                stop = min(e, nxt_ov)
                nxt = b.next_inflight_start(pos)
                if nxt is not None:
                    stop = min(stop, nxt)
                if priority == Priority.FOREGROUND and pos < need_start < stop and b.fill_state is FillState.ACTIVE:
                    # While the blob is being filled, a read's GET starts at its own first page
                    # and the fill brings the refill unit's head. From the unit's start, the
                    # read waited for the whole head: on a fresh connection (10 segments, then
                    # the registry's pacing) that took rounds of 200 ms, 1-1.9 s in all.
                    pos = need_start
                carriers.append(self._launch(b, pos, stop, priority))
                pos = stop
        waits: list[asyncio.Future] = []
        on_background = False
        for t in carriers:
            if t.start < end and t.end > start:
                waits.append(self._waiter(t, min(t.end, need_end)))
                on_background = on_background or t.priority != Priority.FOREGROUND
        return waits, on_background

    def _waiter(self, t: Transfer, need_end: int) -> asyncio.Future:
        """A future resolved once [t.start, need_end) is in the cache, or t ended (result: its
        exception or None). Owned by one waiter: cancelling it affects nobody else."""
        fut = asyncio.get_running_loop().create_future()
        if t.written >= need_end or t.task is None or t.task.done():
            fut.set_result(None)
        else:
            t.waiters.append((need_end, fut))
            self._kick(t)
        return fut

    @staticmethod
    def _wake_waiters(t: Transfer, final: bool = False, error: BaseException | None = None) -> None:
        keep = []
        for need, fut in t.waiters:
            if fut.done():
                continue
            if final or t.written >= need:
                fut.set_result(error)
            else:
                keep.append((need, fut))
        t.waiters = keep

    def _too_slow(self, t: Transfer, need_end: int, now: float) -> bool:
        """Would a fresh foreground GET deliver [.., need_end) sooner than background t?"""
        fresh = self._fg_est
        if fresh is None or not self._progressive or t.sent_at is None:
            return False
        left = need_end - t.arrived
        if left <= 0:
            return False
        if t.received > 0 and t.first_byte_at is not None:
            rate = t.received / max(now - t.first_byte_at, 0.02)
            eta = left / rate
        else:
            # no byte yet: its first byte is due about a fresh latency after it was sent, then
            # it runs at a background flow's share of the link
            per_flow = getattr(self.window, "max_rate", 0.0) / max(1, self.inflight_requests)
            if per_flow <= 0:
                return False
            eta = max(0.0, t.sent_at + fresh - now) + (need_end - t.start) / per_flow
        return eta > fresh

    def _launch(self, b: RemoteBlob, start: int, end: int, priority: Priority, *, counted: bool = False,
                overlay: bool = False) -> Transfer:
        t = Transfer(b, start, end, priority)
        t.counted = counted
        t.queued_at = self.clock()
        t.overlay = overlay
        if overlay:
            b.extra.append(t)
        else:
            b.add(t)
        t.task = asyncio.get_running_loop().create_task(self._run(t), name=repr(t))
        # waiters see the error through their futures; nobody retrieves the task's own
        t.task.add_done_callback(lambda f: f.cancelled() or f.exception())
        return t

    def _promote(self, t: Transfer, priority: Priority) -> None:
        t.priority = priority
        if t.admit is not None and not t.admit.done():
            t.admit.set_result(False)  # start now, outside the window

    # --- admission to the background window -------------------------------------------------------
    async def _acquire(self, priority: Priority, nbytes: int, fut: asyncio.Future | None = None) -> bool:
        """Wait for room in the background window. True: admitted and counted. False: promoted."""
        loop = asyncio.get_running_loop()
        fut = fut or loop.create_future()
        heapq.heappush(self._admission, (int(priority), next(self._seq), fut, nbytes))
        self._pump_admission()
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancel invariant: if we were admitted but cancelled before using it, give it back.
            if fut.done() and not fut.cancelled() and fut.result():
                self.window.on_complete(self.clock(), nbytes, 0.0, ok=False)
                self._pump_admission()
            else:
                fut.cancel()
            raise

    def _pump_admission(self) -> None:
        scale = self.options.fg_yield if self._fg_active else 1.0
        now = self.clock()
        note = getattr(self.window, "set_scale", None)
        if note is not None:
            note(now, scale)
        while self._admission:
            prio, _seq, fut, nbytes = self._admission[0]
            if fut.done():
                heapq.heappop(self._admission)
                continue
            if not self.window.can_start(nbytes, scale):
                break
            heapq.heappop(self._admission)
            self.window.on_start(now, nbytes)
            fut.set_result(True)

    # --- one transfer ----------------------------------------------------------------------------
    def _kick(self, t: Transfer) -> None:
        """Progress side: wake t's runner when a piece is worth writing now."""
        if t.wake is None or t.wake.done():
            return
        ready = t.arrived
        if ready < t.end:
            ready = _align_down(ready, PAGE)
        if ready <= t.written:
            return
        if (ready - t.written >= WRITE_PIECE or ready >= t.end or any(need <= ready for need, _ in t.waiters)
                or self.clock() - t.piece_at >= PIECE_SECONDS):
            t.wake.set_result(None)

    def _on_progress(self, t: Transfer, n: int) -> None:
        if n > t.received:
            t.progress_at = self.clock()
            if t.received == 0:
                t.first_byte_at = t.piece_at = t.progress_at
                if t.priority == Priority.FILL:
                    self.fill_receiving.set()
            t.received = n
            self._kick(t)

    async def _write_ready(self, t: Transfer, view: memoryview, final: bool) -> None:
        """Write what has arrived ([written, received), page aligned unless final) to the cache
        and wake the waiters it satisfies."""
        b = t.blob
        ready = t.arrived
        if not final and ready < t.end:
            ready = _align_down(ready, PAGE)
        if ready <= t.written:
            return
        a = t.written
        await b.cache.write(a, view[a - t.start : ready - t.start],
                            background=t.counted or t.priority != Priority.FOREGROUND)
        t.written = ready
        t.piece_at = self.clock()
        self._wake_waiters(t)

    async def _fetch_into(self, t: Transfer, view: memoryview) -> None:
        """The GET of t. With a progressive fetcher, arrived bytes reach the cache while the
        rest is still on the wire, so a reader waiting inside t wakes when *its* bytes are in."""
        b = t.blob
        if not self._progressive:
            await self.fetcher.read_range_into(b.url, t.start, view)
            t.received = len(view)
            await self._write_ready(t, view, final=True)
            return
        loop = asyncio.get_running_loop()
        fetch = loop.create_task(self.fetcher.read_range_into(b.url, t.start, view,
                                                              progress=lambda n: self._on_progress(t, n)))
        try:
            while not fetch.done():
                t.wake = loop.create_future()
                self._kick(t)
                await asyncio.wait((fetch, t.wake), return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    await self._write_ready(t, view, final=False)
            if not fetch.cancelled() and fetch.exception() is not None:
                # keep what arrived before the failure (the registry went away mid-body): the
                # next attempt then asks only for the rest
                with contextlib.suppress(Exception):
                    await self._write_ready(t, view, final=False)
            fetch.result()
            t.received = len(view)
            await self._write_ready(t, view, final=True)
        finally:
            t.wake = None
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(BaseException):
                    await fetch

    async def _run(self, t: Transfer) -> None:
        b = t.blob
        n = t.end - t.start
        fg = False
        error: BaseException | None = None
        try:
            if t.priority != Priority.FOREGROUND and not t.counted:
                t.admit = asyncio.get_running_loop().create_future()
                t.counted = await self._acquire(t.priority, n, t.admit)
            fg = not t.counted
            if fg:
                self._fg_active += 1
                self.stats.fg_inflight += 1
            if b.cache.is_present(t.start, t.end):
                return
            started = self.clock()
            t.sent_at = started
            buf = _transfer_buffer(n, lazy=not self.fill_receiving.is_set())
            await self._fetch_into(t, buf)
            latency = self.clock() - started
            ttfb = (t.first_byte_at - started) if t.first_byte_at is not None else None
            self.stats.bytes_fetched[t.priority] += n
            b.fetched[t.priority] += n
            self.stats.requests[t.priority] += 1
            if t.counted:
                self.window.on_complete(self.clock(), n, latency, ttfb=ttfb)
                t.counted = False
                if ttfb is not None and latency > ttfb:
                    # what a fresh background request costs (fill endgame, _hedge_pick)
                    self._fill_ttfb = ttfb if self._fill_ttfb is None else min(self._fill_ttfb, ttfb)
                    flow = n / (latency - ttfb)
                    self._fill_flow_rate = flow if not self._fill_flow_rate else 0.8 * self._fill_flow_rate + 0.2 * flow
            else:
                self.window.on_foreground(self.clock(), n, latency, ttfb=ttfb)
                self.stats.observe_fg(latency)
                if n <= 2 * self.refill:
                    self._fg_est = latency if self._fg_est is None else 0.75 * self._fg_est + 0.25 * latency
            if t.priority == Priority.FILL:
                b.fill_errors = 0
        except asyncio.CancelledError as e:
            error = e
            raise
        except Exception as e:
            error = e
            self.stats.failures[t.priority] += 1
            log.info("%s [%d, %d) %s failed: %s", b.digest[:19], t.start, t.end, t.priority.name, e)
            if t.priority == Priority.FILL:
                self._fill_failed(b, e)
            raise
        finally:
            if t.overlay:
                with contextlib.suppress(ValueError):
                    b.extra.remove(t)
            else:
                b.remove(t)
            self._wake_waiters(t, final=True, error=error)
            if t.counted:
                self.window.on_complete(self.clock(), n, 0.0, ok=False)
            if fg:
                self._fg_active -= 1
                self.stats.fg_inflight -= 1
            self._pump_admission()
            self._fill_wake.set()

    # --- background fill ---------------------------------------------------------------------------
    def start_fill(self, source, delay: float | None = None, *, download=None) -> None:
        """Fill `source`'s blob completely in the background, starting after `delay` seconds
        (None: download.delay + random(0..delayExtra), as upstream; `download` is the image's
        DownloadConfig, default the global one). Sync; returns at once. Does not look at
        download.enable: the caller decides (see start_image_fill)."""
        b = self._blob_of(source)
        dl = download or self.download
        b.try_cnt = max(1, dl.try_cnt)
        if b.cache.verified or b.fill_state in (FillState.ACTIVE, FillState.DELAYED, FillState.DONE):
            self._ensure_done_future(b)
            if b.cache.verified and not b.fill_done.done():
                b.fill_done.set_result(None)
            return
        if delay is None:
            delay = float(dl.delay) + random.uniform(0, dl.delay_extra)
        self._ensure_done_future(b)
        b.fill_state = FillState.DELAYED
        b.fill_attempts = 0
        b.delay_task = asyncio.get_running_loop().create_task(self._delayed_fill(b, max(0.0, delay)))
        self._tasks.add(b.delay_task)
        b.delay_task.add_done_callback(self._tasks.discard)

    def start_image_fill(self, image_config, sources) -> int:
        """Upstream's rule: when the image's download.enable is set, fill every remote lower
        that has a layer `dir` (it ends as <dir>/overlaybd.commit). Returns how many started."""
        dl = image_config.download or self.download
        if not dl.enable:
            return 0
        n = 0
        for src in sources:
            b = getattr(src, "blob", None)
            if isinstance(b, RemoteBlob) and b.cache.commit_path:
                self.start_fill(b, download=dl)
                n += 1
        return n

    def _ensure_done_future(self, b: RemoteBlob) -> None:
        if b.fill_done is None or (b.fill_done.done() and not b.cache.verified):
            b.fill_done = asyncio.get_running_loop().create_future()
            b.fill_done.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved"

    async def _delayed_fill(self, b: RemoteBlob, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        if b.fill_state is not FillState.DELAYED:
            return
        b.fill_state = FillState.ACTIVE
        b.fill_cursor = 0
        self._fill_order.append(b)
        if self._filler is None or self._filler.done():
            self._filler = asyncio.get_running_loop().create_task(self._fill_loop(), name="filler")
        self._fill_wake.set()
        log.info("%s: background fill started (%d bytes, %d present)", b.digest[:19], b.size, b.cache.present_bytes)
        b.fill_started_at = self.clock()
        audit("fill_start", digest=b.digest, size=b.size, present=b.cache.present_bytes)

    def stop_fill(self, source) -> None:
        b = self._blob_of(source)
        if b.delay_task is not None:
            b.delay_task.cancel()
            b.delay_task = None
        if b.fill_state in (FillState.DELAYED, FillState.ACTIVE):
            b.fill_state = FillState.IDLE
        if b in self._fill_order:
            self._fill_order.remove(b)

    async def wait_filled(self, source) -> None:
        """Wait until the blob is complete and verified. Raises the fill's error if it gave up."""
        b = self._blob_of(source)
        if b.cache.verified:
            return
        self._ensure_done_future(b)
        await asyncio.shield(b.fill_done)

    def _on_cache_event(self, b: RemoteBlob, event: str) -> None:
        if event == "verified":
            took = {} if b.fill_started_at is None else {"seconds": self.clock() - b.fill_started_at}
            audit("fill_done", digest=b.digest, size=b.size, verified="sha256", **took)
            if b.fill_state is not FillState.IDLE:
                b.fill_state = FillState.DONE
            if b in self._fill_order:
                self._fill_order.remove(b)
            if b.fill_done is not None and not b.fill_done.done():
                b.fill_done.set_result(None)
            self._fill_wake.set()  # upstream mode: the next layer may start now
        elif event == "mismatch":
            audit("verify_failed", digest=b.digest, size=b.size, attempt=b.fill_attempts + 1)
            b.fill_attempts += 1
            b.fill_cursor = 0
            tries = b.try_cnt
            if b.fill_state is FillState.ACTIVE and b.fill_attempts >= tries:
                self._give_up(b, DigestMismatch(f"{b.digest}: sha256 mismatch after {b.fill_attempts} downloads"))
            self._fill_wake.set()

    def _fill_failed(self, b: RemoteBlob, err: BaseException) -> None:
        if self.clock() < b.fill_paused_until:
            return  # a sibling request of the same failed round: already counted
        if isinstance(err, CacheWriteError):
            # the cache disk refuses writes (full, read-only): nothing wrong with the blob or
            # the registry, so it does not count toward tryCnt; the fill waits for the disk
            # (one probing request per interval, _fill_blocked_by_disk) and resumes
            b.fill_paused_until = self.clock() + 1.0
            asyncio.get_running_loop().call_later(1.0, self._fill_wake.set)
            return
        if b.fill_errors == 0:
            b.fill_failing_since = self.clock()
        b.fill_errors += 1
        tries = b.try_cnt
        status = getattr(err, "status", None)
        permanent = isinstance(err, AuthError) or (status is not None and 400 <= status < 500 and status not in (408, 429))
        # the registry client already retried transient errors; tryCnt rounds on top of that
        outage = self.clock() - b.fill_failing_since
        if permanent or (b.fill_errors >= tries and outage >= self.options.fill_outage_grace):
            self._give_up(b, err)
            return
        backoff = min(5.0, 0.05 * 2 ** min(b.fill_errors, 7))
        b.fill_paused_until = self.clock() + backoff
        asyncio.get_running_loop().call_later(backoff, self._fill_wake.set)

    def _give_up(self, b: RemoteBlob, err: BaseException) -> None:
        log.error("%s: background fill failed: %s", b.digest[:19], err)
        audit("fill_failed", digest=b.digest, size=b.size, error=str(err))
        b.fill_state = FillState.FAILED
        b.fill_error = err
        if b in self._fill_order:
            self._fill_order.remove(b)
        if b.fill_done is not None and not b.fill_done.done():
            b.fill_done.set_exception(err)

    def _chunk_size(self) -> int:
        chunk = self.window.chunk if self._auto_chunk else self.fill_chunk
        if self.options.mode == "upstream":
            return chunk
        # Endgame: once the rest of the fill fits in the window, requests shrink so that the
        # last ones end together. Otherwise the last bytes ride a few big requests at one
        # connection's pace each, with the rest of the link idle (on a 200 ms link that tail
        # was ~1 s of a 7 s fill).
        room = min(self.window.window_bytes, self.window.max_requests * chunk)
        left = self._unrequested_fill_bytes(room)
        if left >= room:
            return self._staggered(chunk)
        piece = _align_up(max(0, self._endgame_piece(left)), PAGE)
        return max(min(chunk, self.options.min_chunk), min(chunk, piece))

    def _endgame_piece(self, left: int) -> int:
        """Bytes for the next fill request when only `left` bytes are not yet requested.

        The transfers in flight share the link, each at about one connection's rate, and a new
        request's first byte comes at least a round trip after it is sent. Sized to what one
        connection delivers in the rest of the time that everything still to come takes, it
        ends with the others instead of after them. (With the round trip plus the queue at the
        bottleneck, requests shrank sooner: ~40 % more GETs on the 200 ms rig for the same fill
        time.) Before any background GET has completed (no rates yet): the rest spread over the
        free request slots."""
        per_flow, rtt = self._fill_flow_rate, self._fill_ttfb
        if not per_flow or rtt is None:
            slots = max(1, self.window.max_requests - self.window.inflight_requests)
            return -(-left // slots)
        fill = [t for b in self._fill_order for t in b.inflight if t.priority == Priority.FILL]
        arriving = left + sum(t.awaited for t in fill)
        return int(arriving / (len(fill) + 1) - per_flow * rtt)

    def _staggered(self, chunk: int) -> int:
        """The first burst's request sizes spread from 1/2 to 3/2 of `chunk` (same total).

        Those requests start together on fresh connections that share the link evenly: equal
        sizes all end within one round trip, and the link idles while every connection asks for
        its next range (on the 200 ms rig: a dip to 35-45 MB/s ~2 s into every fetch). Unequal
        sizes end one after another, so the other connections carry on meanwhile."""
        n = self.options.initial_requests
        k = self._fill_launches
        if not self.options.stagger_first_burst or self.options.mode != "adaptive" or n < 2 or k >= n:
            return chunk
        return max(self.options.min_chunk, _align_up(chunk // 2 + chunk * k // (n - 1), PAGE))

    def _unrequested_fill_bytes(self, enough: int) -> int:
        """Bytes of actively filling blobs neither cached nor in flight (stops counting at
        `enough`: only the endgame needs the exact figure)."""
        left = 0
        for b in self._fill_order:
            if b.fill_state is not FillState.ACTIVE:
                continue
            # what a transfer has written so far is already counted as present
            inflight = sum(t.end - t.written for t in b.inflight)
            left += max(0, b.size - b.cache.present_bytes - inflight)
            if left >= enough:
                break
        return left

    def _next_fill_chunk(self) -> tuple[RemoteBlob, int, int] | None:
        """Sync: the next missing, not-in-flight range of the first fill blob that has one."""
        now = self.clock()
        for b in self._fill_order:
            if b.fill_state is not FillState.ACTIVE or b.fill_paused_until > now:
                continue
            if self._fill_blocked_by_disk(b):
                continue
            if self.options.mode == "upstream" and b is not self._fill_order[0]:
                break  # upstream downloads one layer at a time
            for cursor in ((b.fill_cursor, 0) if b.fill_cursor else (0,)):
                pos = cursor
                while True:
                    m = b.cache.first_missing(pos)
                    if m is None:
                        break
                    over = b.overlapping(m, m + 1)
                    if over:
                        if over[0].end <= pos:
                            break  # cannot happen (in-flight ranges are page aligned); never spin
                        pos = over[0].end
                        continue
                    end = min(m + self._chunk_size(), b.size)
                    nxt = b.next_inflight_start(m)
                    if nxt is not None:
                        end = min(end, nxt)
                    runs = b.cache.missing_runs(m, end)
                    end = runs[0][1] if runs else end
                    b.fill_cursor = end
                    return b, m, end
        return None

    def _hedge_pick(self) -> tuple[RemoteBlob, int, int] | None:
        """Sync, fill endgame (every missing byte already in flight): the back half of the fill
        transfer that will finish last (when it awaits less than two minimum requests: all of
        it not yet in the cache), when a fresh request would deliver it much sooner. A
        connection in loss recovery, or one that went idle and restarts slow, otherwise holds
        the whole fill while the link idles: on the 200 ms rig a last 512 KiB request that
        stalled after a loss held a 256 MiB fetch 0.8 s, and one whose last segment (2 KiB)
        was lost held another 2 s, through retransmission timeouts that back off. The
        duplicate bytes (at most a minimum request or half a request per straggler) are the
        price; whichever copy lands first is kept."""
        if self.options.mode == "upstream" or not self._progressive:
            return None
        w = self.window
        if w.inflight_requests >= w.max_requests:
            return None
        rtt, per_flow = self._fill_ttfb, self._fill_flow_rate
        if rtt is None or not per_flow:
            return None
        now = self.clock()
        quiet = max(3 * rtt, HEDGE_MIN_RECEIVING)
        fill = [t for b in self._fill_order if b.fill_state is FillState.ACTIVE for t in (*b.inflight, *b.extra)
                if t.priority == Priority.FILL and not t.hedged and t.sent_at is not None]
        latest = max((t.progress_at for t in fill if t.received > 0), default=0.0)
        worst, worst_eta = None, 0.0
        for t in fill:
            left = t.awaited
            if left <= 0:
                continue
            if t.received > 0 and t.first_byte_at is not None:
                receiving = now - t.first_byte_at
                if now - t.progress_at > quiet:
                    # stalled mid-body: a lost segment waiting for its retransmission timeout,
                    # however few bytes it holds back
                    eta = float("inf")
                elif left < HEDGE_MIN_BYTES:
                    continue  # too little to be worth a round trip while it flows
                elif receiving < max(2 * rtt, HEDGE_MIN_RECEIVING):
                    continue  # its first bytes say little of its rate
                else:
                    eta = left / (t.received / receiving)
            elif left < max(HEDGE_MIN_BYTES, 2 * self.options.min_chunk):
                # no byte yet: more likely queued behind the others (at the registry, at a
                # proxy) than stalled; through a local proxy, asking for these again made a
                # resumed 14 MiB fetch pull 27 MB
                continue
            elif now - t.sent_at > 3 * rtt:
                eta = float("inf")  # no byte after three round trips: stalled
            else:
                eta = (t.sent_at + rtt - now) + left / per_flow
            if eta > worst_eta:
                worst, worst_eta = t, eta
        if worst is None:
            return None
        left = worst.awaited
        if left >= 2 * self.options.min_chunk:
            mid = _align_up(worst.arrived + left // 2, PAGE)
        elif len(fill) > HEDGE_SMALL_MAX_INFLIGHT and latest - worst.progress_at <= quiet:
            # while more are in flight the link is busy with them: a duplicate takes their
            # bandwidth, and a small request that only looks slow among many is rarely late.
            # One that got nothing while the others kept receiving is stalled all the same
            # (our own loop falling behind would hold every transfer's bytes back alike).
            return None
        else:
            # from what is in the cache: bytes received but not yet written stay in a stalled
            # transfer's buffer until its next byte comes, which may be never
            mid = worst.written
        fresh = rtt + (worst.end - mid) / per_flow
        # worth it only when it saves real time: on a short path (loopback, a LAN) every
        # transfer looks slow next to a millisecond RTT, and hedging there only duplicates bytes
        if worst_eta < 2 * fresh or worst_eta - fresh < self.options.hedge_min_gain or mid >= worst.end:
            return None
        worst.hedged = True
        log.info("%s [%d, %d): %d bytes still awaited, due in %.2f s; asking for [%d, %d) again (due in %.2f s)",
                 worst.blob.digest[:19], worst.start, worst.end, left, worst_eta, mid, worst.end, fresh)
        return worst.blob, mid, worst.end

    def _endgame(self) -> bool:
        """Every missing byte of the active fills is in flight, and some of it is."""
        return any(
            b.fill_state is FillState.ACTIVE and b.inflight for b in self._fill_order
        ) and self._unrequested_fill_bytes(1) == 0

    @staticmethod
    def _fill_blocked_by_disk(b: RemoteBlob) -> bool:
        """While the cache disk refuses writes, fetching fill bytes only wastes the link:
        none until the gate's retry time, then one request at a time (its write probes)."""
        gate = getattr(b.cache, "gate", None)
        if gate is None or not gate.closed:
            return False
        return not gate.is_open or bool(b.inflight)

    async def _fill_loop(self) -> None:
        while not self._closed:
            pick = self._next_fill_chunk()
            hedge = False
            if pick is None:
                endgame = self._endgame()
                pick = self._hedge_pick() if endgame else None
                if pick is None:
                    self._fill_wake.clear()
                    if endgame:  # look again in a round trip: a straggler shows only as time passes
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._fill_wake.wait(), timeout=max(0.05, self._fill_ttfb or 0.2))
                    else:
                        await self._fill_wake.wait()
                    continue
                hedge = True
            b, s, e = pick
            n = e - s
            wait = self.bucket.reserve(n, self.clock())
            if wait > 0:
                await asyncio.sleep(wait)
            admitted = await self._acquire(Priority.FILL, n)
            # things moved while we waited: re-validate the range (no awaits from here on); a
            # hedge overlaps its straggler by design, so it only needs the bytes still missing
            ok = admitted and b.fill_state is FillState.ACTIVE and not b.cache.verified and (
                not b.cache.is_present(s, e) if hedge
                else not b.overlapping(s, e) and b.cache.missing_runs(s, e)[:1] == [(s, e)]
            )
            if not ok:
                if admitted:
                    self.window.on_complete(self.clock(), n, 0.0, ok=False)
                self.bucket.refund(n)
                if not hedge and b.fill_cursor == e:
                    b.fill_cursor = s
                self._pump_admission()
                continue
            if hedge:
                self.stats.hedges += 1
                self.stats.hedged_bytes += n
            else:
                self._fill_launches += 1
            self._launch(b, s, e, Priority.FILL, counted=True, overlay=hedge)

    # --- progress -----------------------------------------------------------------------------------
    @property
    def inflight_bytes(self) -> int:
        return sum(t.end - t.start for b in self._blobs.values() for t in b.inflight)

    @property
    def inflight_requests(self) -> int:
        return sum(len(b.inflight) for b in self._blobs.values())

    def blobs(self) -> list[RemoteBlob]:
        return list(self._blobs.values())

    # --- close ----------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop the filler, cancel transfers, flush and close every blob (idempotent)."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in self._tasks]
        if self._filler is not None:
            tasks.append(self._filler)
        for b in self._blobs.values():
            tasks += [t.task for t in b.inflight if t.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in list(self._blobs.values()):
            b.refs = 1
            await self.release(b)
        for owned in self._owned:
            await owned.aclose()
