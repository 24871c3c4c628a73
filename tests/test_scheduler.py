"""Scheduler unit tests against an in-process fake fetcher (fault injection and gating only:
the real registry is exercised in test_scheduler_registry.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import replace

import pytest

from tcmu_obd.cache import CacheStore
from tcmu_obd.config import DownloadConfig, GlobalConfig
from tcmu_obd.errors import DigestMismatch, RemoteError
from tcmu_obd.scheduler import FillState, Priority, Scheduler, SchedulerOptions

KiB = 1024
MiB = 1 << 20
REFILL = 256 * KiB


class Call:
    def __init__(self, url, offset, length):
        self.url, self.offset, self.length = url, offset, length
        self.release = asyncio.Event()
        self.cancelled = False
        self.done = False

    @property
    def end(self):
        return self.offset + self.length

    def __repr__(self):
        return f"<Call [{self.offset}, {self.end})>"


class FakeFetcher:
    """Serves blobs from memory. gated=True: every call waits for `call.release`.
    `corrupt`/`fail` are per-call fault hooks (faults the real registry cannot produce)."""

    def __init__(self, blobs: dict[str, bytes], gated=False):
        self.blobs = blobs
        self.gated = gated
        self.calls: list[Call] = []
        self.active = 0
        self.max_active = 0
        self.fail = lambda call: False
        self.corrupt = lambda call: False
        self._new_call = asyncio.Condition()

    async def blob_size(self, url):
        return len(self.blobs[url])

    async def read_range_into(self, url, offset, buf):
        call = Call(url, offset, len(buf))
        self.calls.append(call)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        async with self._new_call:
            self._new_call.notify_all()
        try:
            if self.gated:
                await call.release.wait()
            else:
                await asyncio.sleep(0)
            if self.fail(call):
                raise RemoteError(f"injected failure at {offset}")
            data = self.blobs[url][offset : offset + len(buf)]
            assert len(data) == len(buf)
            buf[:] = data
            if self.corrupt(call):
                buf[0] ^= 0xFF
            call.done = True
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        finally:
            self.active -= 1

    async def wait_calls(self, n):
        """Wait until at least n calls were made (a real condition, no sleeps)."""
        async with self._new_call:
            await self._new_call.wait_for(lambda: len(self.calls) >= n)
        return self.calls[n - 1]


def make_blob(seed, size):
    data = random.Random(seed).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def make_sched(tmp_path, fetcher, *, mode="fixed", concurrency=1, chunk=1 * MiB, **dl):
    gc = GlobalConfig(download=replace(DownloadConfig(), delay=0, delay_extra=0, max_mbps=0, **dl))
    store = CacheStore(str(tmp_path / "cache"), 0, REFILL, commit_interval=0.01)
    opts = SchedulerOptions(mode=mode, fixed_concurrency=concurrency, fill_chunk=chunk)
    return Scheduler(fetcher, store, gc, opts)


@pytest.fixture
def blob_a():
    data, digest = make_blob(1, 8 * MiB + 1234)
    return f"http://reg/v2/r/blobs/{digest}", data, digest


async def test_foreground_overtakes_queued_fill(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f, concurrency=1)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    fill_call = await f.wait_calls(1)  # the window (1 request) is now full
    assert fill_call.offset == 0
    fg = asyncio.create_task(s.ensure(b, 6 * MiB + 10, 100, Priority.FOREGROUND))
    fg_call = await f.wait_calls(2)
    assert (fg_call.offset, fg_call.length) == (6 * MiB, REFILL)  # refillSize aligned
    assert not fill_call.release.is_set()  # it did not wait for the fill
    fg_call.release.set()
    await fg
    assert len(f.calls) == 2  # the filler did not get a second slot meanwhile
    buf = bytearray(100)
    await b.cache.read_into(6 * MiB + 10, memoryview(buf))
    assert buf == data[6 * MiB + 10 : 6 * MiB + 110]
    await s.aclose()


async def test_prefetch_is_admitted_before_fill(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f, concurrency=1)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    first = await f.wait_calls(1)
    pf = asyncio.create_task(s.ensure(b, 7 * MiB, 4 * KiB, Priority.PREFETCH))
    await asyncio.sleep(0)  # let it queue (ordering only; nothing is timed)
    assert len(f.calls) == 1  # queued behind the full window
    first.release.set()
    second = await f.wait_calls(2)
    assert second.offset == 7 * MiB  # prefetch went before the next fill chunk
    second.release.set()
    await pf
    await s.aclose()


async def test_while_filling_a_foreground_get_starts_at_the_readers_page(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f, concurrency=1)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    fill = await f.wait_calls(1)  # the background window (1 request) is full
    page = 3 * MiB + REFILL - 8 * KiB  # the unit's second-to-last page
    fg = asyncio.create_task(s.ensure(b, page + 100, 10, Priority.FOREGROUND))
    own = await f.wait_calls(2)
    assert (own.offset, own.end) == (page, 3 * MiB + REFILL)  # from the reader's page to the unit's end
    own.release.set()
    await fg  # never waited for the unit's head
    assert not b.cache.is_present(3 * MiB, page)
    fill.release.set()
    # the fill brings the head: its chunk that reaches the unit ends where the read began
    for _ in range(len(data) // MiB + 2):  # the fill's 1 MiB chunks, one at a time
        if b.cache.is_present(3 * MiB, page):
            break
        call = await f.wait_calls(len(f.calls) + 1)
        assert not (call.offset < page < call.end)  # nothing fetched the read's bytes again
        call.release.set()
    assert b.cache.is_present(3 * MiB, page)
    await s.aclose()


async def test_without_a_fill_a_foreground_miss_is_one_refill_aligned_get(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    s = make_sched(tmp_path, f)
    b = await s.open_remote(url, digest, len(data))
    page = 3 * MiB + REFILL - 8 * KiB
    await s.ensure(b, page + 100, 10)  # nothing else will fetch the head: the whole unit
    await s.ensure(b, 2 * MiB + 5, 4 * KiB)  # spans two pages at a unit's start
    assert [(c.offset, c.length) for c in f.calls] == [(3 * MiB, REFILL), (2 * MiB, REFILL)]
    await s.aclose()


async def test_foreground_promotes_a_queued_prefetch(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f, concurrency=1)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await f.wait_calls(1)
    pf = asyncio.create_task(s.ensure(b, 5 * MiB, 4 * KiB, Priority.PREFETCH))
    await asyncio.sleep(0)
    fg = asyncio.create_task(s.ensure(b, 5 * MiB, 4 * KiB, Priority.FOREGROUND))
    call = await f.wait_calls(2)
    assert call.offset == 5 * MiB
    call.release.set()
    await asyncio.gather(pf, fg)
    assert len([c for c in f.calls if c.offset == 5 * MiB]) == 1
    await s.aclose()


async def test_identical_ranges_share_one_fetch_and_cancel_does_not_cancel_it(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f)
    b = await s.open_remote(url, digest, len(data))
    w1 = asyncio.create_task(s.ensure(b, MiB, 4 * KiB))
    call = await f.wait_calls(1)
    w2 = asyncio.create_task(s.ensure(b, MiB, 4 * KiB))
    w3 = asyncio.create_task(s.ensure(b, MiB + 8 * KiB, 4 * KiB))  # same refill unit
    await asyncio.sleep(0)
    w1.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w1
    call.release.set()
    await asyncio.gather(w2, w3)
    assert len(f.calls) == 1 and call.done and not call.cancelled
    await s.aclose()


async def test_foreground_waits_for_an_inflight_fill_chunk(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f, chunk=2 * MiB)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    fill = await f.wait_calls(1)
    assert (fill.offset, fill.length) == (0, 2 * MiB)
    fg = asyncio.create_task(s.ensure(b, MiB, 64 * KiB))
    await asyncio.sleep(0)
    assert len(f.calls) == 1  # no duplicate fetch
    fill.release.set()
    await fg
    await s.aclose()


async def test_misses_separated_by_a_small_gap_coalesce(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    s = make_sched(tmp_path, f)
    b = await s.open_remote(url, digest, len(data))
    await b.cache.write(REFILL, data[REFILL : 2 * REFILL])  # present gap of one refill unit
    await s.ensure(b, 0, 3 * REFILL)
    assert [(c.offset, c.length) for c in f.calls] == [(0, 3 * REFILL)]
    await s.aclose()


async def test_fill_completes_and_verifies(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    s = make_sched(tmp_path, f, mode="adaptive", chunk=MiB)
    b = await s.open_remote(url, digest, len(data))
    await s.ensure(b, 3 * MiB, 10)  # some foreground first
    s.start_fill(b, delay=0)
    await s.wait_filled(b)
    assert b.cache.verified and b.fill_state is FillState.DONE
    with open(b.cache.data_path, "rb") as fh:
        assert fh.read() == data
    assert sum(c.length for c in f.calls) == len(data)  # nothing fetched twice
    assert s.stats.bytes_fetched[Priority.FILL] == len(data) - REFILL
    await s.aclose()


async def test_fill_retries_failed_chunks(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    failed = set()

    def fail_once(call):
        if call.offset not in failed and call.offset % (2 * MiB) == 0:
            failed.add(call.offset)
            return True
        return False

    f.fail = fail_once
    s = make_sched(tmp_path, f, mode="fixed", concurrency=4, chunk=MiB)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await s.wait_filled(b)
    assert failed and s.stats.failures[Priority.FILL] == len(failed)
    await s.aclose()


async def test_digest_mismatch_refetches_then_gives_up_after_try_cnt(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    corrupted = []

    def corrupt_first_pass(call):
        if call.offset == 2 * MiB and not corrupted:
            corrupted.append(call)
            return True
        return False

    f.corrupt = corrupt_first_pass
    s = make_sched(tmp_path, f, chunk=MiB, try_cnt=2)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await s.wait_filled(b)
    assert b.cache.mismatches == 1 and b.cache.verified
    assert sum(c.length for c in f.calls) == 2 * len(data)  # whole blob refetched once
    await s.aclose()

    f2 = FakeFetcher({url: data})
    f2.corrupt = lambda call: call.offset == 0
    s2 = make_sched(tmp_path / "2", f2, chunk=MiB, try_cnt=2)
    b2 = await s2.open_remote(url, digest, len(data))
    s2.start_fill(b2, delay=0)
    with pytest.raises(DigestMismatch):
        await s2.wait_filled(b2)
    assert b2.fill_state is FillState.FAILED and b2.cache.mismatches == 2
    await s2.aclose()


async def test_upstream_mode_is_sequential_block_size_one_in_flight(tmp_path):
    data, digest = make_blob(7, 3 * MiB + 5)
    data2, digest2 = make_blob(8, MiB)
    urls = {f"http://reg/v2/r/blobs/{digest}": data, f"http://reg/v2/r/blobs/{digest2}": data2}
    f = FakeFetcher(urls)
    s = make_sched(tmp_path, f, mode="upstream")
    blobs = [await s.open_remote(u, d, len(urls[u])) for u, d in zip(urls, (digest, digest2))]
    for b in blobs:
        s.start_fill(b, delay=0)
    for b in blobs:
        await s.wait_filled(b)
    assert f.max_active == 1
    sizes = {c.length for c in f.calls}
    assert max(sizes) == 256 * KiB
    order = [(c.url, c.offset) for c in f.calls]
    assert order == sorted(order, key=lambda x: (list(urls).index(x[0]), x[1]))  # layer by layer, in order
    await s.aclose()


async def test_fixed_concurrency_cap(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f, concurrency=3, chunk=MiB)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    calls = [await f.wait_calls(i) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    assert len(f.calls) == 3 and f.active == 3
    # a foreground read is not bound by the cap
    fg = asyncio.create_task(s.ensure(b, 7 * MiB, 10))
    fg_call = await f.wait_calls(4)
    fg_call.release.set()
    await fg
    for c in calls:
        c.release.set()
    f.gated = False
    for c in f.calls:
        c.release.set()
    await s.wait_filled(b)
    assert f.max_active <= 4
    await s.aclose()


async def test_max_mbps_counts_fill_bytes_through_the_bucket(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    s = make_sched(tmp_path, f, mode="adaptive", chunk=MiB)
    s.bucket.rate = 1 << 40  # effectively unlimited, but every fill byte is counted
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await s.wait_filled(b)
    assert s.bucket.taken == len(data)
    await s.aclose()


async def test_start_fill_honours_delay(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    s = make_sched(tmp_path, f)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=3600)
    await asyncio.sleep(0)
    assert b.fill_state is FillState.DELAYED and f.calls == []
    s.stop_fill(b)
    assert b.fill_state is FillState.IDLE
    await s.aclose()


class OverlapCheckingFetcher(FakeFetcher):
    """Yields a random number of times inside each call (no wall clock) and asserts that no
    two calls for the same blob are ever in flight over the same bytes."""

    def __init__(self, blobs, seed):
        super().__init__(blobs)
        self.rnd = random.Random(seed)
        self.inflight: list[tuple[str, int, int]] = []

    async def read_range_into(self, url, offset, buf):
        end = offset + len(buf)
        for u, a, b in self.inflight:
            assert u != url or b <= offset or a >= end, f"[{offset}, {end}) fetched twice at once"
        entry = (url, offset, end)
        self.inflight.append(entry)
        try:
            for _ in range(self.rnd.randint(0, 30)):
                await asyncio.sleep(0)
            await super().read_range_into(url, offset, buf)
        finally:
            self.inflight.remove(entry)


@pytest.mark.parametrize("seed", range(6))
async def test_random_mix_of_reads_prefetch_fill_and_cancels(tmp_path, seed):
    rnd = random.Random(seed)
    data, digest = make_blob(seed, rnd.randint(1, 6) * MiB + rnd.randint(0, 9999))
    url = f"http://reg/v2/r/blobs/{digest}"
    f = OverlapCheckingFetcher({url: data}, seed)
    s = make_sched(tmp_path, f, mode=rnd.choice(["adaptive", "fixed"]), concurrency=3, chunk=512 * KiB)
    b = await s.open_remote(url, digest, len(data))

    async def reader(i):
        off = rnd.randrange(len(data))
        n = min(rnd.randint(1, 300 * KiB), len(data) - off)
        prio = rnd.choice([Priority.FOREGROUND, Priority.FOREGROUND, Priority.PREFETCH])
        await s.ensure(b, off, n, prio)
        buf = bytearray(n)
        await b.cache.read_into(off, memoryview(buf))
        assert buf == data[off : off + n]

    if seed % 2:
        s.start_fill(b, delay=0)
    tasks = [asyncio.create_task(reader(i)) for i in range(40)]
    for _ in range(rnd.randint(0, 50)):
        await asyncio.sleep(0)
    victims = rnd.sample(tasks, 10)
    for t in victims:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for t, r in zip(tasks, results):
        assert r is None or (t in victims and isinstance(r, asyncio.CancelledError)), r
    s.start_fill(b, delay=0)
    await s.wait_filled(b)
    with open(b.cache.path, "rb") as fh:
        assert fh.read() == data
    assert s.inflight_requests == 0 and s.window.inflight_bytes == 0 and s.window.inflight_requests == 0
    await s.aclose()


async def test_background_leaves_connections_for_foreground(tmp_path, blob_a):
    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    f.max_connections = 64
    s = make_sched(tmp_path, f, mode="adaptive")
    assert s.window.max_requests == 56
    await s.aclose()


@pytest.mark.parametrize("wanted", [2, 8, 63, 64, 100])
async def test_a_pool_sized_by_pool_for_leaves_the_whole_window_to_the_background(tmp_path, blob_a, wanted):
    """fetch sizes its connection pool with pool_for: its first burst gets every request it
    asked for (a pool of 64 + 8 had left it 63 of 64, one early connection unused)."""
    from tcmu_obd.scheduler.options import pool_for

    url, data, digest = blob_a
    gc = GlobalConfig(download=replace(DownloadConfig(), delay=0, delay_extra=0, max_mbps=0))

    def window_requests(pool: int, name: str) -> int:
        f = FakeFetcher({url: data})
        f.max_connections = pool
        store = CacheStore(str(tmp_path / name), 0, REFILL, commit_interval=0.01)
        return Scheduler(f, store, gc, SchedulerOptions(mode="adaptive", max_concurrency=wanted)).window.max_requests

    assert window_requests(pool_for(wanted), "a") == wanted
    assert window_requests(pool_for(wanted) - 1, "b") == wanted - 1  # and it is the smallest such pool


async def test_prometheus_collector_exposes_counters(tmp_path, blob_a):
    from prometheus_client import CollectorRegistry, generate_latest

    from tcmu_obd.scheduler.metrics import SchedulerCollector

    url, data, digest = blob_a
    f = FakeFetcher({url: data})
    s = make_sched(tmp_path, f)
    b = await s.open_remote(url, digest, len(data))
    await s.ensure(b, 0, 10)
    reg = CollectorRegistry()
    reg.register(SchedulerCollector(s))
    text = generate_latest(reg).decode()
    assert f'tcmu_obd_fetched_bytes_total{{priority="foreground"}} {float(REFILL)}' in text
    assert 'tcmu_obd_foreground_fetch_seconds_count 1.0' in text
    assert f'tcmu_obd_blob_present_bytes{{digest="{digest}"}} {float(REFILL)}' in text
    await s.aclose()


# --- progressive transfers: a reader inside a slow background transfer -------------------------


class SteppedFetcher(FakeFetcher):
    """A fetcher that reports body progress (like RegistryClient.read_range_into(progress=)).
    Each call delivers its body in steps the test releases: `await call.steps.put(n)` makes
    the first n bytes arrive (None: the rest). `run_free()`: every call from now on (and
    every pending one) delivers at once."""

    free = False

    def run_free(self):
        self.free = True
        for c in self.calls:
            c.steps.put_nowait(None)

    async def read_range_into(self, url, offset, buf, *, progress=None):
        call = Call(url, offset, len(buf))
        call.steps = asyncio.Queue()
        if self.free:
            call.steps.put_nowait(None)
        self.calls.append(call)
        async with self._new_call:
            self._new_call.notify_all()
        data = self.blobs[url][offset : offset + len(buf)]
        pos = 0
        try:
            while pos < len(buf):
                n = await call.steps.get()
                n = len(buf) if n is None else min(n, len(buf))
                buf[pos:n] = data[pos:n]
                pos = max(pos, n)
                if progress is not None:
                    progress(pos)
            call.done = True
        except asyncio.CancelledError:
            call.cancelled = True
            raise


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


async def until(cond, spins=10000):
    """Yield to the loop until cond() holds (bounded: a hang becomes a failure)."""
    for _ in range(spins):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def _read(b, off, n):
    buf = bytearray(n)
    await b.cache.read_into(off, memoryview(buf))
    return bytes(buf)


async def test_reader_inside_a_slow_fill_transfer_wakes_when_its_bytes_arrive(tmp_path, blob_a):
    url, data, digest = blob_a
    f = SteppedFetcher({url: data})
    s = make_sched(tmp_path, f, chunk=4 * MiB)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    fill = await f.wait_calls(1)
    assert (fill.offset, fill.length) == (0, 4 * MiB)
    await fill.steps.put(MiB + 5000)  # the first MiB (and a bit) is here, 3 MiB still on the wire
    await s.ensure(b, 300 * KiB, 4 * KiB)  # a device read inside the arrived part
    assert await _read(b, 300 * KiB, 4 * KiB) == data[300 * KiB : 304 * KiB]
    assert len(f.calls) == 1 and not fill.done  # no second GET, and it did not wait for the rest
    # a reader further in waits (no second fetch: no estimate says a fresh GET would be faster)
    later = asyncio.create_task(s.ensure(b, 3 * MiB, 4 * KiB))
    await fill.steps.put(3 * MiB + 64 * KiB)
    await later
    assert len(f.calls) == 1 and not fill.done
    t = b.inflight[0]
    await fill.steps.put(None)
    await t.task  # the transfer finishes on its own
    assert b.cache.is_present(0, 4 * MiB)
    assert await _read(b, 0, 4 * MiB) == data[: 4 * MiB]
    await s.aclose()


async def test_foreground_overlaps_a_stalled_fill_transfer_and_keeps_it(tmp_path, blob_a):
    """A fresh GET is issued when the background transfer would deliver the reader's bytes
    later than a fresh request takes; the fill transfer is not cancelled, and a second reader
    of the same range shares the foreground GET."""
    url, data, digest = blob_a
    f = SteppedFetcher({url: data})
    s = make_sched(tmp_path, f, chunk=2 * MiB)
    clock = FakeClock()
    s.clock = clock
    b = await s.open_remote(url, digest, len(data))
    # one foreground GET first: a fresh request takes 0.3 s here
    warm = asyncio.create_task(s.ensure(b, 7 * MiB, 4 * KiB))
    c0 = await f.wait_calls(1)
    clock.t += 0.3
    await c0.steps.put(None)
    await warm
    s.start_fill(b, delay=0)
    fill = await f.wait_calls(2)
    assert (fill.offset, fill.length) == (0, 2 * MiB)
    t = b.inflight[0]
    await fill.steps.put(256 * KiB)  # first bytes arrive...
    await until(lambda: t.received == 256 * KiB)
    clock.t += 2.0  # ...then it crawls: 256 KiB in 2 s, the reader's byte is ~1 MiB further
    r1 = asyncio.create_task(s.ensure(b, MiB + 10, 100))
    own = await f.wait_calls(3)
    assert (own.offset, own.length) == (MiB, REFILL)  # its own refill-sized GET
    r2 = asyncio.create_task(s.ensure(b, MiB + 4 * KiB, 100))  # same range: shares it
    await asyncio.sleep(0)
    assert len(f.calls) == 3
    await own.steps.put(None)
    await asyncio.gather(r1, r2)
    assert await _read(b, MiB, 8 * KiB) == data[MiB : MiB + 8 * KiB]
    assert not fill.done and not fill.cancelled and s.overlays == 1
    r1.cancel()  # (done already) a waiter's cancel never touches the shared transfers
    f.run_free()
    await s.wait_filled(b)
    with open(b.cache.path, "rb") as fh:
        assert fh.read() == data
    assert fill.done and not fill.cancelled
    await s.aclose()


async def test_a_waiters_cancel_never_cancels_a_progressive_transfer(tmp_path, blob_a):
    url, data, digest = blob_a
    f = SteppedFetcher({url: data})
    s = make_sched(tmp_path, f, chunk=2 * MiB)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    fill = await f.wait_calls(1)
    w1 = asyncio.create_task(s.ensure(b, MiB, 4 * KiB))
    w2 = asyncio.create_task(s.ensure(b, MiB, 4 * KiB))
    await asyncio.sleep(0)
    w1.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w1
    await fill.steps.put(MiB + 4 * KiB)
    await w2
    assert not fill.cancelled and len(f.calls) == 1
    await fill.steps.put(None)
    await s.aclose()


async def test_fill_endgame_spreads_the_remainder_over_free_request_slots(tmp_path, blob_a):
    """When the rest of a fill fits in the window, it goes out as many small requests at once
    rather than a few window-sized ones that would each run at one connection's pace."""
    url, data, digest = blob_a  # 8 MiB + 1234 bytes
    f = FakeFetcher({url: data}, gated=True)
    s = make_sched(tmp_path, f, concurrency=8, chunk=4 * MiB)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await f.wait_calls(8)
    first = f.calls[:8]
    assert sum(c.length for c in first) == len(data)  # the whole blob, in flight at once
    assert max(c.length for c in first) <= len(data) // 8 + 4 * KiB
    assert all(c.offset % 4096 == 0 for c in first)
    for c in first:
        c.release.set()
    await s.wait_filled(b)
    assert len(f.calls) == 8
    with open(b.cache.path, "rb") as fh:
        assert fh.read() == data
    await s.aclose()


async def test_fill_endgame_sizes_requests_to_end_with_the_transfers_in_flight(tmp_path):
    """Once every connection rate is known, an endgame request is sized to what one
    connection delivers in what the transfers still to come take, less the round trip before
    its first byte; bytes already written by a transfer in flight count once, as present."""
    data, digest = make_blob(6, 6 * MiB)
    url = f"http://reg/v2/r/blobs/{digest}"
    f = SteppedFetcher({url: data})
    s = make_sched(tmp_path, f, concurrency=4, chunk=1 * MiB)
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await f.wait_calls(4)
    calls = sorted(f.calls, key=lambda c: c.offset)
    assert [(c.offset, c.length) for c in calls] == [(i * MiB, MiB) for i in range(4)]
    assert s._chunk_size() == MiB  # no rate known yet: the 2 MiB left over the free slots
    for c in calls:
        await c.steps.put(512 * KiB)
    await until(lambda: all(t.written == t.start + 512 * KiB for t in b.inflight))
    assert b.cache.present_bytes == 4 * 512 * KiB
    assert s._unrequested_fill_bytes(1 << 40) == 2 * MiB  # written bytes are not left twice
    s._fill_flow_rate, s._fill_ttfb = float(MiB), 0.25
    # (2 MiB left + 4 x 512 KiB still to come) over 5 transfers, less 0.25 s at 1 MiB/s
    assert s._chunk_size() == 577536  # 576716 bytes, page-aligned up
    s._fill_ttfb = 2.0  # the transfers in flight end first: the smallest request
    assert s._chunk_size() == 256 * KiB
    s._fill_flow_rate = 1.0  # a crawling link: the round trip costs nothing, the share is all
    assert s._chunk_size() == 839680  # 4 MiB / 5, page-aligned up
    f.run_free()
    await s.wait_filled(b)
    with open(b.cache.path, "rb") as fh:
        assert fh.read() == data
    await s.aclose()


async def _stepped_fill(tmp_path, seed, size, chunk, n):
    """`n` fill requests of `chunk` cover a blob of `size` bytes (the endgame from the start),
    on a fake clock. Returns the scheduler, the fetcher, the blob, the clock, the data and the
    calls by offset."""
    data, digest = make_blob(seed, size)
    url = f"http://reg/v2/r/blobs/{digest}"
    f = SteppedFetcher({url: data})
    s = make_sched(tmp_path, f, concurrency=n, chunk=chunk)
    clock = FakeClock()
    s.clock = clock
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await f.wait_calls(n)
    calls = sorted(f.calls[:n], key=lambda c: c.offset)
    assert calls[-1].end == len(data)
    return s, f, b, clock, data, calls


async def _endgame_with_one_straggler(tmp_path, seed, size, chunk, first):
    """Four fill requests cover the whole blob. Each sees its first `first` bytes 0.2 s after
    it was sent; 0.4 s later (a transfer's rate is judged on two round trips of body at least)
    all but the first have finished. Returns the scheduler, the fetcher, the blob, the
    straggler's call, the clock and the data."""
    s, f, b, clock, data, calls = await _stepped_fill(tmp_path, seed, size, chunk, 4)
    slow = calls[0]
    clock.t += 0.2
    for c in calls:
        await c.steps.put(first)
    await until(lambda: all(t.received == first for t in b.inflight))
    clock.t += 0.4
    others = [t.task for t in b.inflight if t.start != slow.offset]
    for c in calls[1:]:
        await c.steps.put(None)
    await asyncio.gather(*others)
    return s, f, b, slow, clock, data


async def _finish_with_the_hedge(s, b, hedge, slow, data):
    assert (s.stats.hedges, s.stats.hedged_bytes) == (1, hedge.end - hedge.offset)
    await hedge.steps.put(None)
    await s.wait_filled(b)
    assert not slow.done  # the fill did not wait for the straggler's own copy
    with open(b.cache.path, "rb") as fh:
        assert fh.read() == data
    await s.aclose()


async def test_fill_endgame_requests_a_stragglers_back_half_again(tmp_path):
    """Every missing byte is in flight and one transfer crawls (a connection in loss
    recovery): its back half is requested again on a fresh request, the fill completes with
    the fresh copy, and the straggler is not waited for."""
    s, f, b, slow, clock, data = await _endgame_with_one_straggler(tmp_path, 3, 8 * MiB, 2 * MiB, 64 * KiB)
    # the straggler is at 160 KiB/s, the others ran at ~5 MB/s: with nothing left to hand
    # out, the filler looks again within a round trip (the bound only turns a hang into a
    # failure)
    hedge = await asyncio.wait_for(f.wait_calls(5), timeout=30)
    assert hedge.end == slow.end and slow.offset + 64 * KiB < hedge.offset < slow.end
    await slow.steps.put(hedge.offset - slow.offset)  # the straggler's front half, no more
    await _finish_with_the_hedge(s, b, hedge, slow, data)


async def test_fill_endgame_requests_a_transfer_stalled_mid_body_again(tmp_path):
    """A transfer whose bytes came quickly and then stopped (a lost segment waiting for its
    retransmission timeout) looks fine by its average rate; no byte for three round trips
    makes it a straggler all the same, and the fill does not wait for it."""
    s, f, b, slow, clock, data = await _endgame_with_one_straggler(tmp_path, 5, 2 * MiB, 512 * KiB, 320 * KiB)
    # by its average (320 KiB in 0.4 s) the straggler is due in 0.25 s: no hedge yet
    assert s._hedge_pick() is None
    clock.t += 0.5  # ... but nothing has come for 0.9 s: more than three round trips
    hedge = await asyncio.wait_for(f.wait_calls(5), timeout=30)
    assert hedge.end == slow.end and slow.offset <= hedge.offset <= slow.offset + 320 * KiB
    await _finish_with_the_hedge(s, b, hedge, slow, data)


async def test_fill_endgame_requests_all_a_small_straggler_awaits_again(tmp_path):
    """A straggler with less than two minimum requests left (fetch's 512 KiB requests end
    this way) is not split: all of it that is not in the cache yet is requested again (bytes
    it received but has not written stay in its buffer while it stalls), and the fill
    completes without it."""
    s, f, b, slow, clock, data = await _endgame_with_one_straggler(tmp_path, 4, 2 * MiB, 512 * KiB, 64 * KiB + 100)
    hedge = await asyncio.wait_for(f.wait_calls(5), timeout=30)
    # 448 KiB left (< 2 x 256 KiB), nothing written yet (less than a write piece arrived)
    assert (hedge.offset, hedge.end) == (slow.offset, slow.end)
    await _finish_with_the_hedge(s, b, hedge, slow, data)


async def test_fill_endgame_requests_a_stalled_last_segment_again(tmp_path):
    """A transfer that got all but its last 2 KiB and then nothing (its last segment lost: the
    retransmission timeout backs off, on the rig it held a fetch 2 s) is asked for again
    once it has stalled, though so few bytes are not worth a request while they flow."""
    s, f, b, slow, clock, data = await _endgame_with_one_straggler(tmp_path, 6, 2 * MiB, 512 * KiB, 510 * KiB)
    assert s._hedge_pick() is None  # 0.4 s since its last byte: not stalled yet
    clock.t += 0.5
    hedge = await asyncio.wait_for(f.wait_calls(5), timeout=30)
    assert hedge.end == slow.end and slow.offset <= hedge.offset <= slow.end - 2 * KiB
    await _finish_with_the_hedge(s, b, hedge, slow, data)


async def test_fill_endgame_requests_a_small_transfer_stalled_among_many_again(tmp_path):
    """Among more than four fill transfers a small one is not asked for again for looking
    slow, nor when every transfer has gone quiet together (our own loop fell behind, or the
    link stopped: a duplicate would fare no better); one that got nothing for three round
    trips while the others kept receiving is."""
    s, f, b, clock, data, calls = await _stepped_fill(tmp_path, 7, 7 * 512 * KiB, 512 * KiB, 7)
    slow, others, first_done = calls[0], calls[1:6], calls[6]
    clock.t += 0.2
    for c in calls:
        await c.steps.put(256 * KiB)
    await until(lambda: all(t.received == 256 * KiB for t in b.inflight))
    clock.t += 0.4  # one finishes (a round trip and a flow rate to cost a hedge with)
    await first_done.steps.put(None)
    await until(lambda: len(b.inflight) == 6)
    await slow.steps.put(510 * KiB)
    for c in others:
        await c.steps.put(320 * KiB)
    await until(lambda: sum(t.received for t in b.inflight) == 510 * KiB + 5 * 320 * KiB)
    clock.t += 0.7
    assert s._hedge_pick() is None  # all six quiet alike for 0.7 s
    for c in others:
        await c.steps.put(384 * KiB)
    hedge = await asyncio.wait_for(f.wait_calls(8), timeout=30)
    assert hedge.end == slow.end and slow.offset <= hedge.offset <= slow.end - 2 * KiB
    for c in others:
        await c.steps.put(None)
    await _finish_with_the_hedge(s, b, hedge, slow, data)


async def test_first_fill_burst_has_staggered_sizes(tmp_path):
    """Adaptive mode with stagger_first_burst (fetch's): the first `initial_requests` fill
    requests go from 1/2 to 3/2 of the chunk (same total), so the fresh connections that carry
    them do not all end in the same round trip; later requests keep the chunk size."""
    data, digest = make_blob(5, 32 * MiB)
    url = f"http://reg/v2/r/blobs/{digest}"
    f = FakeFetcher({url: data}, gated=True)
    gc = GlobalConfig(download=replace(DownloadConfig(), delay=0, delay_extra=0, max_mbps=0))
    store = CacheStore(str(tmp_path / "cache"), 0, REFILL, commit_interval=0.01)
    s = Scheduler(f, store, gc, SchedulerOptions(mode="adaptive", fill_chunk=1 * MiB, initial_requests=8,
                                                 max_concurrency=8, stagger_first_burst=True))
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await f.wait_calls(8)
    sizes = [c.length for c in f.calls[:8]]
    assert sizes == sorted(sizes) and len(set(sizes)) == 8, sizes
    assert sizes[0] == MiB // 2 and sizes[-1] == 3 * MiB // 2
    assert abs(sum(sizes) - 8 * MiB) <= 8 * 4096
    assert all(c.offset % 4096 == 0 for c in f.calls[:8])
    f.calls[0].release.set()
    f.calls[1].release.set()  # 1.1 MiB of the 8 MiB window free: room for one more request
    ninth = await f.wait_calls(9)
    assert ninth.length == MiB  # the burst is over: back to the chunk
    f.gated = False
    for c in f.calls:
        c.release.set()
    await s.wait_filled(b)
    with open(b.cache.path, "rb") as fh:
        assert fh.read() == data
    await s.aclose()


@pytest.mark.parametrize("mode,stagger", [("fixed", True), ("adaptive", False)])
async def test_no_stagger_in_fixed_mode_or_by_default(tmp_path, blob_a, mode, stagger):
    url, data, digest = blob_a
    f = FakeFetcher({url: data}, gated=True)
    gc = GlobalConfig(download=replace(DownloadConfig(), delay=0, delay_extra=0, max_mbps=0))
    store = CacheStore(str(tmp_path / "cache"), 0, REFILL, commit_interval=0.01)
    s = Scheduler(f, store, gc, SchedulerOptions(mode=mode, fill_chunk=1 * MiB, fixed_concurrency=4, initial_requests=4,
                                                 max_concurrency=4, stagger_first_burst=stagger))
    b = await s.open_remote(url, digest, len(data))
    s.start_fill(b, delay=0)
    await f.wait_calls(4)
    assert [c.length for c in f.calls[:4]] == [MiB] * 4
    await s.aclose()
