"""One test per registry fault class, through the fault proxy in front of the real docker-registry.

Covered elsewhere: 5xx/429 bursts, resets mid-body, slow first byte, storage URL expiry, and a
token that expires mid-fill (tests/remote/test_registry_faults.py:
test_injected_401_mid_fill_refreshes_token); kill -9 of `fetch` (tests/test_fetch.py, and all of
them at once in test_chaos_fetch.py). Here: a short body, a flipped byte in a plain blob and in a
ZFile layer, a storage host (redirect target) that starts failing, and the registry going away
and coming back. Synchronisation is on counters, never on sleeps."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from tcmu_obd.cache import CacheStore
from tcmu_obd.config import CacheConfig, DownloadConfig, GlobalConfig
from tcmu_obd.errors import RemoteError
from tcmu_obd.format import zfile as zf
from tcmu_obd.image.zfile_source import ZFileSource
from tcmu_obd.remote import RetryPolicy
from tcmu_obd.remote.registry import RegistryClient
from tcmu_obd.remote_source import RemoteBlobSource
from tcmu_obd.scheduler import Scheduler, SchedulerOptions
from tcmu_obd.scheduler.core import FillState
from tests.reliability.helpers import sha256, zfile_blob
from tests.remote.helpers import client
from tests.support.faultproxy import Fault, PresignedStorage
from tests.support.registry import blob_url, push_blob, registry  # noqa: F401  (fixture)

pytestmark = pytest.mark.registry

MiB = 1 << 20


async def wait_for(cond, what: str, timeout: float = 30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _gc(tmp_path, **dl) -> GlobalConfig:
    return GlobalConfig(
        cache_config=CacheConfig(cache_type="file", cache_dir=str(tmp_path / "cache"), cache_size_gb=1),
        download=replace(DownloadConfig(), delay=0, delay_extra=0, max_mbps=0, **dl),
    )


class _Rig:
    """RegistryClient + CacheStore + Scheduler over the proxy, closed in reverse."""

    def __init__(self, tmp_path, *, try_cnt: int = 5, **opts):
        self.gc = _gc(tmp_path, try_cnt=try_cnt)
        self.client = RegistryClient(self.gc)
        self.store = CacheStore.from_config(self.gc)
        self.sched = Scheduler(self.client, self.store, self.gc, SchedulerOptions(**opts))

    async def aclose(self):
        await self.sched.aclose()
        await self.store.aclose()
        await self.client.aclose()


async def test_truncated_body_fetches_only_the_rest(registry, fault_proxy):  # noqa: F811
    data = random.Random(3).randbytes(2 * MiB)
    digest = push_blob(registry.url, "faults/trunc", data)
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, "faults/trunc", digest)
    f = proxy.add(Fault(kind="truncate", after_bytes=400_000))
    async with client() as c:
        assert await c.read_range(url, 1000, MiB) == data[1000:1000 + MiB]
    gets = [e for e in proxy.log if e.method == "GET"]
    assert f.hits == 1 and len(gets) == 2
    # the second GET asks only for what the short body did not carry
    assert gets[1].headers["Range"] == f"bytes={1000 + 400_000}-{1000 + MiB - 1}"
    assert proxy.sent_bytes() == MiB


async def test_flipped_byte_in_plain_blob_is_refetched_never_marked_valid(tmp_path, registry,  # noqa: F811
                                                                          fault_proxy):
    """No CRC to say where: the digest catches it, the whole blob is dropped and fetched again."""
    data = random.Random(4).randbytes(3 * MiB + 777)
    digest = push_blob(registry.url, "faults/flip", data)
    proxy = fault_proxy(registry.url)
    flip = proxy.add(Fault(kind="corrupt", at=2 * MiB + 5))
    rig = _Rig(tmp_path, fill_chunk=MiB)
    try:
        b = await rig.sched.open_remote(blob_url(proxy.url, "faults/flip", digest), digest, len(data))
        events: list[str] = []
        b.cache.listeners.append(lambda e: events.append(e) if e != "flushed" else None)
        rig.sched.start_fill(b, delay=0)
        await rig.sched.wait_filled(b)
        assert flip.hits == 1
        assert events == ["mismatch", "verified"]  # never verified with the wrong byte
        assert b.cache.mismatches == 1 and b.cache.repaired_bytes == 0
        src = RemoteBlobSource(rig.sched, b)
        out = bytearray(16)
        await src.read_into(2 * MiB, memoryview(out))
        assert bytes(out) == data[2 * MiB:2 * MiB + 16]
        assert (tmp_path / "cache" / digest).read_bytes() == data
        assert proxy.sent_bytes() == 2 * len(data)  # the price of a blob without block CRCs
        await src.aclose()
    finally:
        await rig.aclose()


async def test_flipped_byte_in_zfile_caught_by_crc_on_lazy_read(tmp_path, registry, fault_proxy):  # noqa: F811
    raw_blob = zfile_blob(2, seed=5)
    raw = zf.decompress_bytes(raw_blob)
    digest = push_blob(registry.url, "faults/zflip", raw_blob)
    h = zf.parse_header_trailer(raw_blob[:zf.HEADER_SIZE])
    jt = zf.JumpTable.from_index(raw_blob[h.index_offset:h.index_offset + 4 * h.index_size], h)
    block = 300
    off, ln = jt.block_range(block)
    proxy = fault_proxy(registry.url)
    flip = proxy.add(Fault(kind="corrupt", at=off + ln // 2))
    rig = _Rig(tmp_path)
    try:
        b = await rig.sched.open_remote(blob_url(proxy.url, "faults/zflip", digest), digest, len(raw_blob))
        src = RemoteBlobSource(rig.sched, b)
        z = await ZFileSource.open(src)
        out = bytearray(8192)
        await z.read_into(block * 4096 - 100, memoryview(out))
        assert flip.hits == 1
        assert bytes(out) == raw[block * 4096 - 100:block * 4096 - 100 + 8192]  # the wrong byte was never served
        assert z.retries == 1 and rig.sched.invalidated_bytes > 0
        # the bad bytes were dropped from the cache, so the full fill verifies at once
        rig.sched.start_fill(b, delay=0)
        await rig.sched.wait_filled(b)
        assert b.cache.mismatches == 0
        assert sha256((tmp_path / "cache" / digest).read_bytes()) == digest
        await z.aclose()
    finally:
        await rig.aclose()


async def test_redirect_target_starts_failing(registry, fault_proxy):  # noqa: F811
    data = random.Random(6).randbytes(MiB)
    digest = push_blob(registry.url, "faults/redir", data)
    storage = PresignedStorage(registry.blob_path)
    proxy = fault_proxy(registry.url, storage=storage)
    url = blob_url(proxy.url, "faults/redir", digest)
    async with client(retry=RetryPolicy(attempts=4, backoff_initial=0.001, backoff_max=0.01)) as c:
        assert await c.read_range(url, 0, 1000) == data[:1000]
        assert proxy.redirects == 1
        # the storage host starts answering 503 for a while: the client drops the cached
        # location, resolves again through the registry and gets through once it recovers
        bad = storage.add(Fault(status=503, match="/bucket/", times=2))
        assert await c.read_range(url, 5000, 100_000) == data[5000:105000]
        assert bad.hits == 2 and proxy.redirects == 3
        # a storage host that keeps failing ends in a clear error, not a hang
        storage.add(Fault(status=500, match="/bucket/", times=-1))
        with pytest.raises(RemoteError, match="server error 500.*after 4 attempts"):
            await c.read_range(url, 200_000, 1000)
    assert storage.auth_violations == []


async def test_registry_down_then_back(tmp_path, registry, fault_proxy):  # noqa: F811
    """The registry goes away mid-fill (connections dropped) and comes back: the fill outlives
    more failed rounds than tryCnt and finishes, resuming where it was."""
    data = random.Random(8).randbytes(8 * MiB)
    digest = push_blob(registry.url, "faults/down", data)
    proxy = fault_proxy(registry.url)
    proxy.add(Fault(kind="slow", chunk=64 << 10, delay=0.005, times=-1))
    rig = _Rig(tmp_path, try_cnt=2, mode="fixed", fixed_concurrency=2, fill_chunk=MiB)
    try:
        b = await rig.sched.open_remote(blob_url(proxy.url, "faults/down", digest), digest, len(data))
        rig.sched.start_fill(b, delay=0)
        await wait_for(lambda: b.cache.present_bytes >= 2 * MiB, "2 MiB filled")
        down = proxy.go_down()
        # stay away until the fill has failed more rounds than tryCnt (2)
        await wait_for(lambda: b.fill_errors >= 3, "three failed fill rounds")
        assert b.fill_state is FillState.ACTIVE
        at_back = b.cache.present_bytes
        proxy.come_back()
        await rig.sched.wait_filled(b)
        assert down.hits >= 3
        assert (tmp_path / "cache" / digest).read_bytes() == data
        # resumed: at most the bodies cut off by the outage were sent twice
        assert proxy.sent_bytes() <= len(data) + 2 * MiB
        assert at_back < len(data)
    finally:
        await rig.aclose()
