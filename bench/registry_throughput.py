"""Benchmark: 4 MiB range GETs against the local registry, at several concurrency levels.

Prints MB/s for a few concurrency levels; asserts only correctness (no timed assertions).
Run: .venv/bin/pytest -s bench/registry_throughput.py  (not part of the test suite: speed is measured, not asserted)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import time

import pytest

from tests.remote.helpers import client
from tests.support.registry import RegistryProcess, push_blob

pytestmark = [pytest.mark.registry]

SIZE = int(os.environ.get("OBD_BENCH_MIB", "256")) << 20
CHUNK = 4 << 20


def test_range_get_throughput(tmp_path):
    path = tmp_path / "big.blob"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(SIZE // (8 << 20)):
            block = os.urandom(8 << 20)
            h.update(block)
            f.write(block)
    with RegistryProcess(tmp_path / "reg") as reg:
        t = time.monotonic()
        digest = push_blob(reg.url, "bench/big", path)  # streamed from disk
        push_s = time.monotonic() - t
        assert digest == "sha256:" + h.hexdigest()
        os.unlink(path)
        url = reg.blob_url("bench/big", digest)
        print(f"\npush {SIZE >> 20} MiB: {SIZE / push_s / 1e6:.0f} MB/s")

        async def run(conc: int) -> tuple[float, float]:
            out = bytearray(SIZE)
            mv = memoryview(out)
            async with client(max_connections=conc) as c:
                sem = asyncio.Semaphore(conc)

                async def one(off):
                    async with sem:
                        await c.read_range_into(url, off, mv[off : off + CHUNK])

                await c.read_range(url, 0, 1)  # connection + size
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.monotonic()
                await asyncio.gather(*(one(off) for off in range(0, SIZE, CHUNK)))
                dt = time.monotonic() - t0
                r1 = resource.getrusage(resource.RUSAGE_SELF)
            assert hashlib.sha256(out).hexdigest() == digest.split(":")[1]
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            return SIZE / dt / 1e6, cpu / (SIZE / 1e9)

        for conc in (1, 4, 16, 64):
            mbps, cpu_per_gb = asyncio.run(run(conc))
            print(f"4 MiB ranges, {conc:>2} concurrent: {mbps:.0f} MB/s, client {cpu_per_gb:.2f} CPU-s/GB")
