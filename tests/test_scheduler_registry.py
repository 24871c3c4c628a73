"""Scheduler + cache against Debian's real docker-registry (tests/support/registry.py)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from tcmu_obd.cache import CacheStore, PresenceMap
from tcmu_obd.config import CacheConfig, DownloadConfig, GlobalConfig, ImageConfig, LowerConfig
from tcmu_obd.remote.registry import RegistryClient
from tcmu_obd.scheduler import Priority, Scheduler, SchedulerOptions
from tests.support.paths import FIXTURES_OBD
from tests.support.registry import push_blob, registry  # noqa: F401  (fixture)
from tests.support.scheduling import assert_fetched_once, transfers_done

pytestmark = pytest.mark.registry

LAYERS = FIXTURES_OBD / "ext4-chain" / "layers"
L1 = LAYERS / "L1.lz4.zfile"


def _gc(tmp_path, **dl):
    return GlobalConfig(
        cache_config=CacheConfig(cache_type="file", cache_dir=str(tmp_path / "cache"), cache_size_gb=1),
        download=replace(DownloadConfig(), delay=0, delay_extra=0, max_mbps=0, **dl),
    )


async def _open(tmp_path, gc, **opts):
    client = RegistryClient(gc)
    store = CacheStore.from_config(gc)
    sched = Scheduler(client, store, gc, SchedulerOptions(**opts))
    return client, store, sched


async def _close(client, store, sched):
    await sched.aclose()
    await store.aclose()
    await client.aclose()


async def test_fill_from_registry_and_verify(tmp_path, registry):  # noqa: F811
    data = L1.read_bytes()
    digest = push_blob(registry.url, "sched/fill", L1)
    gc = _gc(tmp_path)
    client, store, sched = await _open(tmp_path, gc, fill_chunk=256 * 1024)
    b = await sched.open_remote(registry.blob_url("sched/fill", digest), digest)  # size from the registry
    assert b.size == len(data)
    sched.start_fill(b, delay=0)
    await sched.wait_filled(b)
    assert b.cache.verified
    assert (tmp_path / "cache" / digest).read_bytes() == data
    assert PresenceMap.load(str(tmp_path / "cache" / (digest + ".map")), len(data)).verified
    assert_fetched_once(sched.stats.bytes_fetched[Priority.FILL], len(data), sched.stats.hedged_bytes)
    assert sched.stats.requests[Priority.FILL] >= len(data) // (256 * 1024)
    await sched.release(b)
    await _close(client, store, sched)

    # a verified blob is never fetched again
    client, store, sched = await _open(tmp_path, gc)
    b = await sched.open_remote(registry.blob_url("sched/fill", digest), digest, len(data))
    assert b.cache.verified
    sched.start_fill(b, delay=0)
    await sched.wait_filled(b)
    assert sched.stats.total_fetched == 0 and client.stats.requests == 0
    await _close(client, store, sched)


async def test_dir_lower_reads_then_commits_and_switches(tmp_path, registry):  # noqa: F811
    data = L1.read_bytes()
    digest = push_blob(registry.url, "sched/dir", L1)
    gc = _gc(tmp_path)
    layer_dir = tmp_path / "layer"
    layer_dir.mkdir()
    cfg = ImageConfig(
        repo_blob_url=registry.repo_blob_url("sched/dir"),
        lowers=(LowerConfig(dir=str(layer_dir), digest=digest, size=len(data)),),
        source=str(tmp_path / "config.v1.json"),
    )
    client, store, sched = await _open(tmp_path, gc)
    src = await sched.open_blob(cfg, cfg.lowers[0])
    rnd = random.Random(3)
    for _ in range(20):  # foreground reads before any fill: served through the cache
        off = rnd.randrange(len(data))
        n = min(rnd.randint(1, 200_000), len(data) - off)
        buf = bytearray(n)
        await src.read_into(off, memoryview(buf))
        assert buf == data[off : off + n]
    await transfers_done(sched)
    assert sched.stats.bytes_fetched[Priority.FOREGROUND] > 0
    assert (layer_dir / ".download").exists()
    sched.start_fill(src, delay=0)
    await sched.wait_filled(src)
    assert (layer_dir / "overlaybd.commit").read_bytes() == data
    assert not (layer_dir / ".download").exists() and not (layer_dir / ".download.map").exists()
    # nothing was fetched twice
    assert_fetched_once(sum(sched.stats.bytes_fetched.values()), len(data), sched.stats.hedged_bytes)
    buf = bytearray(4096)
    await src.read_into(len(data) - 4096, memoryview(buf))
    assert buf == data[-4096:]
    assert src.local_path == str(layer_dir / "overlaybd.commit")  # reads switched to the commit
    await src.aclose()
    await _close(client, store, sched)


async def test_corrupt_cache_range_is_detected_and_refetched(tmp_path, registry):  # noqa: F811
    data = random.Random(11).randbytes(3 << 20)
    digest = push_blob(registry.url, "sched/corrupt", data)
    url = registry.blob_url("sched/corrupt", digest)
    gc = _gc(tmp_path)
    client, store, sched = await _open(tmp_path, gc)
    b = await sched.open_remote(url, digest, len(data))
    await sched.ensure(b, 0, 1 << 20, Priority.FOREGROUND)  # first MiB cached for real
    await sched.release(b)
    await _close(client, store, sched)

    path = tmp_path / "cache" / digest
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF  # flip a byte inside a present range
    path.write_bytes(raw)
    m = PresenceMap.load(str(path) + ".map", len(data))
    m.mark(2 << 20, 3 << 20)  # forge presence of a range never fetched (zeros on disk)
    (tmp_path / "cache" / (digest + ".map")).write_bytes(m.to_bytes())

    client, store, sched = await _open(tmp_path, gc)
    b = await sched.open_remote(url, digest, len(data))
    sched.start_fill(b, delay=0)
    await sched.wait_filled(b)
    assert b.cache.mismatches == 1
    assert path.read_bytes() == data
    # first pass fetched the 1 MiB that looked missing, the refetch all 3 MiB
    assert_fetched_once(sched.stats.bytes_fetched[Priority.FILL], len(data) + (1 << 20),
                        sched.stats.hedged_bytes)
    await _close(client, store, sched)


async def test_image_stack_over_remote_lowers(tmp_path, registry):  # noqa: F811
    """The lead's open_image with our scheduler: reads equal the same image from local files."""
    from tcmu_obd.image.stack import open_image

    repo = "sched/stack"
    lowers = []
    for name in ("L1.lz4.zfile", "L2.lz4.zfile"):
        p = LAYERS / name
        d = push_blob(registry.url, repo, p)
        lowers.append({"digest": d, "size": p.stat().st_size, "dir": str(tmp_path / name)})
        (tmp_path / name).mkdir()
    remote_cfg = tmp_path / "remote.config.v1.json"
    remote_cfg.write_text(json.dumps({"repoBlobUrl": registry.repo_blob_url(repo), "lowers": lowers}))
    local_cfg = FIXTURES_OBD / "ext4-chain" / "configs" / "L12.lz4.zfile.config.v1.json"
    gc = _gc(tmp_path)
    client, store, sched = await _open(tmp_path, gc)
    remote = await open_image(remote_cfg, gc, scheduler=sched)
    local = await open_image(local_cfg, gc)
    try:
        assert remote.size == local.size
        rnd = random.Random(5)
        for _ in range(30):
            off = rnd.randrange(0, min(remote.size, 64 << 20) // 512) * 512
            n = rnd.randint(1, 64) * 512
            n = min(n, remote.size - off)
            assert await remote.read(off, n) == await local.read(off, n)
        await transfers_done(sched)
        assert sched.stats.bytes_fetched[Priority.FOREGROUND] > 0
    finally:
        await remote.aclose()
        await local.aclose()
        await _close(client, store, sched)


async def test_trace_replay_prefetches_at_prefetch_priority(tmp_path, registry):  # noqa: F811
    from tcmu_obd.format.trace import TraceRecord
    from tcmu_obd.image.stack import open_image
    from tcmu_obd.scheduler import replay_trace

    repo = "sched/trace"
    lowers = []
    for name in ("L1.lz4.zfile", "L2.lz4.zfile"):
        p = LAYERS / name
        lowers.append({"digest": push_blob(registry.url, repo, p), "size": p.stat().st_size})
    cfg_path = tmp_path / "config.v1.json"
    cfg_path.write_text(json.dumps({"repoBlobUrl": registry.repo_blob_url(repo), "lowers": lowers}))
    gc = _gc(tmp_path)
    client, store, sched = await _open(tmp_path, gc)
    image = await open_image(cfg_path, gc, scheduler=sched)
    try:
        opened = sched.stats.total_fetched  # headers/indexes read while opening
        layers = [layer.source for layer in image.lowers]
        records = [TraceRecord("R", i % 2, 64 << 10, (i * 1_000_000) % (layers[i % 2].size - (64 << 10)))
                   for i in range(12)]
        records.append(TraceRecord("W", 0, 4096, 0))  # not a read: skipped
        records.append(TraceRecord("R", 7, 4096, 0))  # no such layer: skipped
        st = await replay_trace(records, layers, concurrency=4)
        assert (st.records, st.skipped, st.failed) == (12, 2, 0)
        await transfers_done(sched)  # counters are updated when a transfer ends
        assert sched.stats.bytes_fetched[Priority.PREFETCH] > 0
        before = sched.stats.total_fetched
        assert before > opened
        for r in records[:12]:  # the device now finds those ranges cached
            buf = bytearray(r.count)
            await layers[r.layer_index].read_into(r.offset, memoryview(buf))
        assert sched.stats.total_fetched == before
    finally:
        await image.aclose()
        await _close(client, store, sched)


async def test_fill_survives_resets_and_503s(tmp_path, registry):  # noqa: F811
    from tests.support.faultproxy import Fault, FaultProxy

    data = random.Random(21).randbytes(5 << 20)
    digest = push_blob(registry.url, "sched/faults", data)
    with FaultProxy(registry.url) as proxy:
        proxy.add(Fault(kind="reset", after_bytes=100_000, times=3, skip=1))
        proxy.add(Fault(kind="status", status=503, headers={"Retry-After": "0"}, times=2, skip=2))
        gc = _gc(tmp_path)
        client, store, sched = await _open(tmp_path, gc, fill_chunk=512 * 1024)
        b = await sched.open_remote(f"{proxy.url}/v2/sched/faults/blobs/{digest}", digest, len(data))
        sched.start_fill(b, delay=0)
        await sched.wait_filled(b)
        assert (tmp_path / "cache" / digest).read_bytes() == data
        assert client.stats.retries >= 1
        await _close(client, store, sched)


async def test_create_owns_client_and_store(tmp_path, registry):  # noqa: F811
    data = random.Random(31).randbytes(300_000)
    digest = push_blob(registry.url, "sched/create", data)
    gc = _gc(tmp_path)
    sched = await Scheduler.create(gc)
    b = await sched.open_remote(registry.blob_url("sched/create", digest), digest)
    await sched.ensure(b, 0, len(data))
    client = sched.fetcher
    await sched.aclose()
    assert client._closed  # closed with the scheduler
    assert (tmp_path / "cache" / digest).exists()
