"""Metrics while a real fill runs: the exporter on an ephemeral port, scraped over HTTP, in
front of Debian's docker-registry behind the fault proxy (a "slow" body keeps the fill
running long enough to scrape it twice; a 503 gives the retries-by-cause counter a value)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_obd.cache import CacheStore
from tcmu_obd.config import load_global_config
from tcmu_obd.ops.logs import configure
from tcmu_obd.ops.observability import Observability
from tcmu_obd.ops.statusview import fetch_status, render
from tcmu_obd.remote.registry import RegistryClient
from tcmu_obd.scheduler import Priority, Scheduler, SchedulerOptions
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.paths import FIXTURES_OBD
from tests.support.registry import push_blob, registry  # noqa: F401  (fixture)
from tests.support.scheduling import assert_fetched_once

pytestmark = pytest.mark.registry

L1 = FIXTURES_OBD / "ext4-chain" / "layers" / "L1.lz4.zfile"
KiB = 1024


def _global_config(tmp_path):
    path = tmp_path / "overlaybd.json"
    path.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
        "download": {"enable": False, "delay": 0, "delayExtra": 0, "maxMBps": 0},
        "exporterConfig": {"enable": True, "port": 0, "uriPrefix": "/custom/metrics"},
        "enableAudit": True,
        "auditPath": str(tmp_path / "audit" / "audit.log"),
    }))
    return load_global_config(str(path))


def _parse(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _until(cond, what: str, timeout: float = 30.0):
    """Poll a real condition (scrapes, counters); never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        v = await cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def test_scrapes_during_a_fill_show_bytes_and_inflight_moving(tmp_path, registry):  # noqa: F811
    data = L1.read_bytes()
    digest = push_blob(registry.url, "ops/fill", L1)
    gc = _global_config(tmp_path)
    logs = configure(gc, upstream_defaults=False)
    with FaultProxy(registry.url) as proxy:
        proxy.add(Fault(kind="status", status=503, headers={"Retry-After": "0"}, times=1))
        proxy.add(Fault(kind="slow", chunk=32 * KiB, delay=0.1, times=-1))  # ~4 s for the blob
        client = RegistryClient(gc)
        store = CacheStore.from_config(gc)
        sched = Scheduler(client, store, gc, SchedulerOptions(mode="fixed", fixed_concurrency=2,
                                                              fill_chunk=128 * KiB))
        obs = Observability(gc, command="test", control_socket=str(tmp_path / "ctl.sock"))
        obs.sample_interval = 0.05
        try:
            await obs.start()
            assert obs.metrics_port and obs.metrics_url.endswith("/custom/metrics")
            url = f"http://127.0.0.1:{obs.metrics_port}/custom/metrics"
            b = await sched.open_remote(f"{proxy.url}/v2/ops/fill/blobs/{digest}", digest, len(data))
            sched.start_fill(b, delay=0)
            done = asyncio.ensure_future(sched.wait_filled(b))
            fetched = ("tcmu_obd_fetched_bytes_total", (("priority", "fill"),))
            inflight = ("tcmu_obd_inflight_bytes", ())
            layer_rate = ("tcmu_obd_layer_fetch_throughput_bytes_per_second", (("digest", digest),))
            async with aiohttp.ClientSession() as http:
                async def scrape() -> dict:
                    async with http.get(url) as r:
                        assert r.status == 200
                        return _parse(await r.text())

                first = await _until(lambda: _scrape_if(scrape, lambda m: m.get(fetched, 0) > 0),
                                     "the first fill bytes in a scrape")
                assert 0 < first[fetched] < len(data) and first[inflight] > 0
                assert not done.done()
                # the next scrape once the scheduler has more bytes than the first one showed
                await _until(lambda: _true(sched.stats.bytes_fetched[Priority.FILL] > first[fetched]),
                             "more fill bytes")
                second = await scrape()
                assert not done.done(), "the fill finished before the second scrape"
                assert first[fetched] < second[fetched] < len(data) and second[inflight] > 0
                # the throughput gauge is sampled on a timer: it shows the fill while it runs
                moving = await _until(lambda: _scrape_if(scrape, lambda m: m.get(layer_rate, 0) > 0),
                                      "a fill throughput")
                assert not done.done() and moving[("tcmu_obd_fetch_throughput_bytes_per_second",
                                                   (("priority", "fill"),))] > 0
                # the live view over the control socket is the same numbers
                st = await fetch_status(str(tmp_path / "ctl.sock"))
                assert st["command"] == "test" and st["metrics_url"] == obs.metrics_url
                text = render(st)
                assert digest[:19] in text and "fill" in text and "in flight" in text
                proxy.clear()  # seen moving: the rest at full speed
                await done
                final = await scrape()
            assert_fetched_once(final[fetched], len(data), sched.stats.hedged_bytes)
            assert final[inflight] == 0
            assert final[("tcmu_obd_layer_fill_ratio", (("digest", digest),))] == 1.0
            assert final[("tcmu_obd_layer_fill_state", (("digest", digest), ("state", "done")))] == 1.0
            assert final[("tcmu_obd_registry_retries_total", (("cause", "throttled"),))] == 1
            # a foreground read of a cached range is a hit; the collector counts it per layer
            assert final[("tcmu_obd_layer_cache_misses_total", (("digest", digest),))] == 0
        finally:
            await obs.aclose()
            await sched.aclose()
            await store.aclose()
            await client.aclose()
            logs.close()
    assert not (tmp_path / "ctl.sock").exists()
    lines = (tmp_path / "audit" / "audit.log").read_text().splitlines()
    start = [ln for ln in lines if f" fill_start digest={digest} size={len(data)} present=0" in ln]
    end = [ln for ln in lines if f" fill_done digest={digest} size={len(data)} verified=sha256 seconds=" in ln]
    assert len(start) == 1 and len(end) == 1 and lines.index(start[0]) < lines.index(end[0])


async def _scrape_if(scrape, pred):
    m = await scrape()
    return m if pred(m) else None


async def _true(v):
    return v


async def test_reads_count_hits_and_misses_and_audit_slow_reads(tmp_path, registry):  # noqa: F811
    from tcmu_obd.ops.metrics import ObdCollector
    from tcmu_obd.remote_source import RemoteBlobSource
    from prometheus_client import CollectorRegistry, generate_latest

    data = L1.read_bytes()
    digest = push_blob(registry.url, "ops/reads", L1)
    gc = _global_config(tmp_path)
    logs = configure(gc, upstream_defaults=False)
    client = RegistryClient(gc)
    store = CacheStore.from_config(gc)
    sched = Scheduler(client, store, gc)
    sched.slow_read_seconds = 0.0  # every miss is "slow": the audit line must appear
    try:
        b = await sched.open_remote(registry.blob_url("ops/reads", digest), digest, len(data))
        src = RemoteBlobSource(sched, b)
        buf = bytearray(4096)
        await src.read_into(8192, memoryview(buf))  # miss: fetched from the registry
        await src.read_into(8192, memoryview(buf))  # hit
        assert bytes(buf) == data[8192:12288]
        # the read returns once its page is in; the refill-sized GET is counted when it ends
        await _until(lambda: _true(sched.inflight_requests == 0), "the foreground GET to end")
        reg = CollectorRegistry()
        reg.register(ObdCollector(schedulers=lambda: [sched]))
        m = _parse(generate_latest(reg).decode())
        d = (("digest", digest),)
        assert m[("tcmu_obd_layer_reads_total", d)] == 2
        assert m[("tcmu_obd_layer_cache_hits_total", d)] == 1
        assert m[("tcmu_obd_layer_cache_misses_total", d)] == 1
        assert m[("tcmu_obd_cache_misses_total", ())] == 1 and m[("tcmu_obd_slow_reads_total", ())] == 1
        assert m[("tcmu_obd_foreground_read_wait_seconds_count", ())] == 1
        assert m[("tcmu_obd_layer_fetched_bytes_total", d + (("priority", "foreground"),))] > 0
    finally:
        await sched.aclose()
        await store.aclose()
        await client.aclose()
        logs.close()
    lines = (tmp_path / "audit" / "audit.log").read_text().splitlines()
    assert [ln.split(" ", 2)[2].rsplit(" seconds=", 1)[0] for ln in lines if " slow_read " in ln] == [
        f"slow_read digest={digest} offset=8192 length=4096"]
