"""Disk faults under a running server: a cache filesystem that fills up, cache files deleted or
truncated while the daemon serves from them.

Real parts throughout: the real docker-registry, a real small filesystem (tmpfs mounted with a
size limit: the kernel's own ENOSPC, not a simulated one), real `tcmu-obd serve` / `export`
processes or the in-process NBDServer, and nbdcopy (libnbd) as the NBD client. The image is the
ext4-chain fixture's L1 layer as a plain LSMT blob (~6.6 MiB of data): larger than the 4 MiB
cache filesystem, so the cache cannot hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tcmu_obd.config import load_global_config
from tcmu_obd.demo.nbdclient import NBDClient
from tcmu_obd.frontends.nbd.server import NBDServer
from tcmu_obd.image.stack import open_image
from tcmu_obd.scheduler import Scheduler, SchedulerOptions
from tests.support.paths import FIXTURES_OBD
from tests.support.registry import push_blob
from tests.support.scheduling import transfers_done

pytestmark = pytest.mark.registry

MiB = 1 << 20
EXPECTED = json.loads((FIXTURES_OBD / "expected.json").read_text())
L1_SHA = EXPECTED["ext4-chain"]["images"]["L1"]["raw_sha256"]
L1_BLOB = FIXTURES_OBD / "ext4-chain" / "layers" / "L1.lsmt"
TCMU_OBD = [sys.executable, "-m", "tcmu_obd.cli"]
FULL_WARNING = "cannot be written"
RESUMED = "writable again"


@contextlib.contextmanager
def small_fs(path: Path, size: str):
    """A tmpfs of `size` at `path`: a real filesystem that runs out of space."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"these tests mount a small tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def serve_process(gcfg: str, cfg: str, sock: Path, stderr: Path):
    """A read-only `tcmu-obd serve` process on `sock`, listening when this yields (proc, the
    stderr file); terminated on exit, which must be clean (exit 0)."""
    with open(stderr, "w") as errlog:
        proc = subprocess.Popen([*TCMU_OBD, "serve", "--global-config", gcfg, cfg, "--nbd", f"unix:{sock}",
                                 "--read-only"], stdout=subprocess.PIPE, stderr=errlog, text=True)
        try:
            assert "listening on" in proc.stdout.readline()
            yield proc, stderr
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0


def make_config(tmp_path: Path, registry, cache_dir: Path) -> tuple[str, str, str]:
    """(global config, image config, blob digest) for L1.lsmt pushed to the registry."""
    digest = push_blob(registry.url, "test/disk-faults", L1_BLOB)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "repoBlobUrl": f"{registry.url}/v2/test/disk-faults/blobs",
        "lowers": [{"digest": digest, "size": L1_BLOB.stat().st_size}],
        "resultFile": str(tmp_path / "result"),
    }))
    gcfg = tmp_path / "global.json"
    gcfg.write_text(json.dumps({"cacheConfig": {"cacheType": "file", "cacheDir": str(cache_dir), "cacheSizeGB": 1},
                                "enableAudit": False}))
    return str(gcfg), str(cfg), digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    runs, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        runs.append((start, end))
        pos = end
    return runs


def same_disk(a: Path, b: Path) -> bool:
    """Two sparse raw files hold the same bytes (reads only their data runs: hashing a whole
    1 GiB disk per check would cost seconds)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        size = os.fstat(fa.fileno()).st_size
        if os.fstat(fb.fileno()).st_size != size:
            return False
        for start, end in _data_runs(fa.fileno(), size) + _data_runs(fb.fileno(), size):
            if os.pread(fa.fileno(), end - start, start) != os.pread(fb.fileno(), end - start, start):
                return False
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The L1 disk as a sparse raw file, exported from the local blob and checked once against
    the fixture's published sha256."""
    d = tmp_path_factory.mktemp("reference")
    (d / "config.json").write_text(json.dumps({"lowers": [{"file": str(L1_BLOB)}], "resultFile": str(d / "r")}))
    (d / "global.json").write_text(json.dumps({"enableAudit": False}))
    out = d / "L1.raw"
    r = subprocess.run([*TCMU_OBD, "export", "--global-config", str(d / "global.json"), "--no-progress",
                        str(d / "config.json"), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == L1_SHA
    return out


async def nbdcopy(sock: Path, out: Path, reference: Path) -> bool:
    """Copy the whole export with nbdcopy (a real NBD client, in its own process); True when
    it matches the reference disk."""
    proc = await asyncio.create_subprocess_exec("nbdcopy", f"nbd+unix:///?socket={sock}", str(out),
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return same_disk(out, reference)


def test_full_cache_disk_serve_and_export_read_right_bytes(tmp_path, reference, registry):
    """The cache filesystem (4 MiB) is smaller than the blob: a `serve` process keeps serving the
    right bytes (straight from the registry once the cache is full), twice over, keeps running,
    and says so once; `export` of the same image is bit-exact and warns once too."""
    with small_fs(tmp_path / "cachefs", "4m") as cache_dir:
        gcfg, cfg, digest = make_config(tmp_path, registry, cache_dir)
        sock = tmp_path / "nbd.sock"
        with serve_process(gcfg, cfg, sock, tmp_path / "serve.err") as (proc, stderr):
            for i in range(2):
                assert asyncio.run(nbdcopy(sock, tmp_path / f"out{i}.raw", reference))
                assert proc.poll() is None  # still serving
            st = os.statvfs(cache_dir)
            assert st.f_bavail * st.f_frsize < 64 * 1024  # the cache really filled its disk
        err = stderr.read_text()
        assert err.count(FULL_WARNING) == 1, err
        assert "No space left on device" in err
        assert "Traceback" not in err

        r = subprocess.run([*TCMU_OBD, "export", "--global-config", gcfg, "--no-progress", cfg,
                            str(tmp_path / "export.raw")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert same_disk(tmp_path / "export.raw", reference)
        assert r.stderr.count(FULL_WARNING) == 1, r.stderr


@contextlib.asynccontextmanager
async def served(gcfg: str, cfg: str, sock: Path):
    """The image served in-process by NBDServer over one Scheduler: (scheduler, source)."""
    scheduler = await Scheduler.create(load_global_config(gcfg))
    image = await open_image(cfg, load_global_config(gcfg), scheduler=scheduler, read_only=True,
                             background_fill=False)
    server = NBDServer(image, read_only=True)
    await server.serve_unix(str(sock))
    try:
        (source,) = [s for s in image.blob_sources if getattr(s, "blob", None) is not None]
        yield scheduler, source
    finally:
        await server.aclose(grace=5)
        await image.aclose()
        await scheduler.aclose()


async def test_full_cache_disk_caching_resumes_when_space_frees(tmp_path, reference, registry, caplog):
    """A ballast file leaves the cache 1 MiB: reads past that are served directly (right bytes,
    one warning); once the ballast is deleted, the next missed read is cached again."""
    caplog.set_level(logging.INFO)
    with small_fs(tmp_path / "cachefs", "8m") as cache_dir:
        ballast = cache_dir / "ballast"
        ballast.write_bytes(bytes(7 * MiB))
        gcfg, cfg, _digest = make_config(tmp_path, registry, cache_dir)
        sock = tmp_path / "nbd.sock"
        async with served(gcfg, cfg, sock) as (scheduler, source):
            gate = scheduler.cache.gate
            gate.retry_after = gate.max_retry_after = 0.05  # probe often: the test frees space at once
            assert await nbdcopy(sock, tmp_path / "out.raw", reference)
            cache = source.blob.cache
            assert gate.closed and source.direct_bytes > 0
            assert not cache.complete

            ballast.unlink()
            client = await NBDClient.connect_unix(str(sock))
            try:
                # reads the cache does not hold yet: pages of the disk's data, spread out
                with open(reference, "rb") as f:
                    runs = _data_runs(f.fileno(), os.fstat(f.fileno()).st_size)
                    offsets = [o for a, b in runs for o in range(a - a % 4096, b - 4096, 256 * 1024)]
                    want = {o: os.pread(f.fileno(), 4096, o) for o in offsets}
                cached_before = cache.present_bytes
                for off in offsets:
                    assert await client.read(off, 4096) == want[off]
                    if not gate.closed and cache.present_bytes > cached_before:
                        break
                    await asyncio.sleep(gate.retry_after)  # pace the probes; not a synchronisation
            finally:
                await client.aclose()
            assert not gate.closed, "caching did not resume after space was freed"
            assert cache.present_bytes > cached_before
    warnings = [r.getMessage() for r in caplog.records if FULL_WARNING in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert any(RESUMED in r.getMessage() for r in caplog.records)


async def test_cache_file_deleted_under_running_server_is_recreated(tmp_path, reference, registry):
    """Deleting the cache file while the server runs: detected (nlink 0), the file is made again
    at its path and the bytes are fetched again; every read stays right."""
    gcfg, cfg, digest = make_config(tmp_path, registry, tmp_path / "cache")
    sock = tmp_path / "nbd.sock"
    async with served(gcfg, cfg, sock) as (scheduler, source):
        cache = source.blob.cache
        assert await nbdcopy(sock, tmp_path / "out0.raw", reference)
        cached = cache.present_bytes
        fetched = scheduler.stats.total_fetched
        assert cached > 0
        os.unlink(cache.data_path)
        assert await nbdcopy(sock, tmp_path / "out1.raw", reference)
        assert cache.lost == 1
        assert os.path.exists(cache.data_path)
        await transfers_done(scheduler)  # counters are updated when a transfer ends
        assert scheduler.stats.total_fetched - fetched >= cached // 2  # fetched again, not read from the ghost
        assert os.stat(cache.data_path).st_blocks * 512 >= cached // 2  # and stored in the new file


def test_cache_file_truncated_under_serve_process_never_reads_zeros(tmp_path, reference, registry):
    """Truncating the cache file under a running `serve` process (once to a page-unaligned size,
    once to zero): every later read is still the right bytes, the server keeps running and logs
    what it dropped."""
    gcfg, cfg, digest = make_config(tmp_path, registry, tmp_path / "cache")
    data_path = tmp_path / "cache" / digest
    sock = tmp_path / "nbd.sock"
    with serve_process(gcfg, cfg, sock, tmp_path / "serve.err") as (proc, stderr):
        assert asyncio.run(nbdcopy(sock, tmp_path / "out0.raw", reference))
        for size in (MiB + 123, 0):
            os.truncate(data_path, size)
            assert asyncio.run(nbdcopy(sock, tmp_path / f"out{size}.raw", reference))
            assert proc.poll() is None
            assert os.stat(data_path).st_size == L1_BLOB.stat().st_size  # made whole again
    err = stderr.read_text()
    assert err.count("truncated to") == 2, err
    assert "Traceback" not in err


async def test_write_after_truncation_never_exposes_the_hole(tmp_path):
    """A truncated cache file must not be re-extended by the next write with the lost range still
    marked present (it would read back as zeros): the write notices first and drops it."""
    from tcmu_obd.cache import BlobCache
    from tcmu_obd.cache.blob import CacheLost

    size = 4 * MiB
    data = os.urandom(size)
    cache = BlobCache(digest="sha256:" + hashlib.sha256(data).hexdigest(), size=size,
                      data_path=str(tmp_path / "blob"), map_path=str(tmp_path / "blob.map"))
    try:
        await cache.write(0, data[: 3 * MiB])
        await cache.flush()
        os.truncate(tmp_path / "blob", MiB + 5)
        await cache.write(3 * MiB, data[3 * MiB:])  # would extend the file over [1 MiB, 3 MiB)
        assert cache.lost == 1
        assert cache.missing_runs() == [(MiB, 3 * MiB)]
        assert await _read(cache, 0, MiB) == data[:MiB]
        assert await _read(cache, 3 * MiB, MiB) == data[3 * MiB:]
        # truncated again with no write in between: the next read notices and refuses
        os.truncate(tmp_path / "blob", 3 * MiB + 100)
        with pytest.raises(CacheLost):
            await _read(cache, 3 * MiB + 8192, 4096)
        assert cache.lost == 2 and not cache.is_present(3 * MiB, 4 * MiB)
        assert cache.is_present(0, MiB) and await _read(cache, 0, MiB) == data[:MiB]  # before the cut: kept
    finally:
        await cache.aclose()


async def _read(cache, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    await cache.read_into(offset, memoryview(buf))
    return bytes(buf)


async def test_full_disk_evicts_unused_blobs_first(tmp_path):
    """When the cache disk fills up, blobs nobody has open (LRU) are removed to make room, and
    once the gate lets a write through again it lands."""
    from tcmu_obd.cache import CacheStore
    from tcmu_obd.cache.blob import CacheWriteError

    old, new = os.urandom(1536 * 1024), os.urandom(2 * MiB)
    d_old = "sha256:" + hashlib.sha256(old).hexdigest()
    d_new = "sha256:" + hashlib.sha256(new).hexdigest()
    with small_fs(tmp_path / "cachefs", "2m") as cache_dir:
        store = CacheStore(str(cache_dir), 1 << 30)
        try:
            blob = store.open_blob(d_old, len(old))
            await blob.write(0, old)
            await store.release(blob)  # cached, unused
            blob = store.open_blob(d_new, len(new))
            store.gate.retry_after = store.gate.max_retry_after = 0.0  # let the next write probe at once
            with pytest.raises(CacheWriteError):
                await blob.write(0, new[:MiB])
            assert store.evicted == [d_old] and not (cache_dir / d_old).exists()
            await blob.write(0, new[:MiB])
            assert not store.gate.closed and blob.is_present(0, MiB)
            await store.release(blob)
        finally:
            await store.aclose()


async def test_background_fill_waits_for_a_full_disk_and_then_completes(tmp_path, registry):
    """A fill that hits a full cache disk is paused, not failed (a disk problem is not the
    blob's: it does not count toward tryCnt, here 1, nor toward the registry-outage grace,
    here 0), and completes and verifies once space is freed."""
    from tcmu_obd.cache import CacheStore
    from tcmu_obd.config import load_image_config
    from tcmu_obd.remote.registry import RegistryClient

    with small_fs(tmp_path / "cachefs", "8m") as cache_dir:
        ballast = cache_dir / "ballast"
        ballast.write_bytes(bytes(7 * MiB))
        gpath, cpath, digest = make_config(tmp_path, registry, cache_dir)
        gcfg = load_global_config(gpath)
        icfg = load_image_config(cpath, gcfg)
        client = RegistryClient(gcfg)
        sched = Scheduler(client, CacheStore.from_config(gcfg), gcfg, SchedulerOptions(fill_outage_grace=0))
        try:
            src = await sched.open_blob(icfg, icfg.lowers[0])
            gate = src.cache.gate
            gate.retry_after = gate.max_retry_after = 0.05
            download = type(gcfg.download)(**{**gcfg.download.__dict__, "try_cnt": 1})
            sched.start_fill(src, delay=0, download=download)
            done = asyncio.ensure_future(sched.wait_filled(src))
            while not gate.closed:  # the fill runs into the full disk
                await asyncio.wait({done}, timeout=0.05)
                assert not done.done(), "the fill ended without ever hitting the full disk"
            for _ in range(10):  # ... and keeps going (paused) instead of failing
                await asyncio.wait({done}, timeout=0.1)
            assert not done.done()
            ballast.unlink()
            await asyncio.wait_for(done, timeout=60)
            assert src.cache.verified and not gate.closed
        finally:
            await sched.aclose()
            await client.aclose()
