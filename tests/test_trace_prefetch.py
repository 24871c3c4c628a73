"""Trace record and replay through the image, as upstream's recordTracePath protocol works."""

from __future__ import annotations

import json
import os

from tcmu_obd.config import load_global_config
from tcmu_obd.format.trace import parse_trace
from tcmu_obd.image.stack import open_image
from tcmu_obd.scheduler import Priority, Scheduler
from tests.support.paths import FIXTURES_OBD
from tests.support.registry import push_blob
from tests.support.scheduling import transfers_done

LAYERS = FIXTURES_OBD / "ext4-chain" / "layers"


async def test_record_then_replay_prefetches_what_was_read(tmp_path, registry):
    blobs = [LAYERS / "L1.lz4.zfile", LAYERS / "L2.zstd.zfile"]
    lowers = [{"digest": push_blob(registry.url, "test/trace", b), "size": b.stat().st_size} for b in blobs]
    trace = tmp_path / "trace"
    trace.write_bytes(b"")  # empty file: record mode
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"repoBlobUrl": f"{registry.url}/v2/test/trace/blobs", "lowers": lowers,
                                  "recordTracePath": str(trace)}))
    gfile = tmp_path / "global.json"
    gfile.write_text(json.dumps({"cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache1")}}))
    gcfg = load_global_config(gfile)

    scheduler = await Scheduler.create(gcfg)
    try:
        image = await open_image(str(config), gcfg, scheduler=scheduler)
        assert os.path.exists(str(trace) + ".lock")
        data = [e for e in image.extents(0, image.size) if e.kind == "data"]
        biggest = max(data, key=lambda e: e.length)
        # reads far from the blob headers (which opening fetched): what a booting guest reads
        reads = [(e.offset, 4096) for e in data[-3:]] + [(biggest.offset + biggest.length // 2, 256 << 10)]
        expected = [await image.read(off, n) for off, n in reads]
        await image.aclose()  # closing ends the recording
    finally:
        await scheduler.aclose()
    assert not os.path.exists(str(trace) + ".lock") and os.path.exists(str(trace) + ".ok")
    records = parse_trace(trace.read_bytes())
    assert records and {r.layer_index for r in records} <= {0, 1}
    assert len(records) >= len(reads)

    # A fresh cache: replaying the trace fetches what the reads needed at PREFETCH priority,
    # so the same reads afterwards need no foreground fetch at all.
    gfile.write_text(json.dumps({"cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache2")}}))
    gcfg = load_global_config(gfile)
    scheduler = await Scheduler.create(gcfg)
    try:
        image = await open_image(str(config), gcfg, scheduler=scheduler)
        try:
            assert image.trace_replay is not None
            # opening fetched headers and indexes (FOREGROUND); the replay has not run yet
            fg_at_open = scheduler.stats.requests[Priority.FOREGROUND]
            present_at_open = sum(b.cache.present_bytes for b in scheduler.blobs())
            stats = await image.trace_replay
            assert stats.records == len(records) and stats.failed == 0
            await transfers_done(scheduler)  # counters are updated when a transfer ends
            present_after = sum(b.cache.present_bytes for b in scheduler.blobs())
            diag = (dict(scheduler.stats.bytes_fetched), dict(scheduler.stats.requests),
                    dict(scheduler.stats.failures), present_at_open, present_after,
                    [(b.digest[:19], b.size, b.cache.present_bytes, b.cache.gate.closed) for b in scheduler.blobs()])
            # the replay fetched nothing at foreground priority, and the 256 KiB read (in L1, past
            # what opening fetched) came in at PREFETCH priority into the cache
            assert scheduler.stats.requests[Priority.FOREGROUND] == fg_at_open, diag
            assert scheduler.stats.bytes_fetched[Priority.PREFETCH] > 0, diag
            assert present_after > present_at_open, diag
            fg_before = scheduler.stats.requests[Priority.FOREGROUND]
            assert [await image.read(off, n) for off, n in reads] == expected
            assert scheduler.stats.requests[Priority.FOREGROUND] == fg_before
        finally:
            await image.aclose()
    finally:
        await scheduler.aclose()
