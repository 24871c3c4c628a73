"""kill -9 of a real `tcmu-obd serve` (NBD) process, driven by real clients (qemu-io, and the
project's demo NBD client), with a remote lower behind the fault proxy in front of the real
docker-registry:

* during the background fill: every range the durable map marks present is correct, and the
  restarted server resumes the fill without fetching those ranges again;
* during foreground reads: the same, and reads after the restart are right;
* during writes to a writable upper: every write acknowledged by an NBD FLUSH survives, and a
  torn tail of the upper's data file is detected and dropped at reopen.

Synchronisation is on the durable presence map and the upper's index file, never on sleeps."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tcmu_obd.cache import PresenceMap
from tcmu_obd.cli import main as cli_main
from tcmu_obd.config import GlobalConfig
from tcmu_obd.demo.nbdclient import NBDClient, NBDClientError
from tcmu_obd.format import lsmt
from tcmu_obd.image.stack import open_image
from tests.frontends.test_nbd_clients import Served
from tests.reliability.helpers import durable_bytes, zfile_raw
from tests.support.faultproxy import Fault
from tests.support.paths import FIXTURES_OBD
from tests.support.registry import push_blob, registry, wait_until  # noqa: F401  (fixture)

pytestmark = pytest.mark.registry

KiB, MiB = 1 << 10, 1 << 20
L1 = FIXTURES_OBD / "ext4-chain" / "layers" / "L1.lz4.zfile"
L1_CONFIG = FIXTURES_OBD / "ext4-chain" / "configs" / "L1.lz4.zfile.config.v1.json"
READ_SPAN = 16 * MiB


@pytest.fixture(scope="module")
def layer32(tmp_path_factory) -> tuple[bytes, bytes]:
    """(raw disk, its committed ZFile layer): 32 MiB that compress to ~24 MiB, so a fill
    through a slowed link is many requests long."""
    d = tmp_path_factory.mktemp("layer32")
    raw = zfile_raw(32, seed=9)
    (d / "raw").write_bytes(raw)
    assert cli_main(["build", str(d / "raw"), str(d / "layer"), "-z"]) == 0
    return raw, (d / "layer").read_bytes()


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(*args: str) -> Served:
        s = Served(list(args), tmp_path, full_cli=True)
        started.append(s)
        assert s.uri, f"serve did not start: {s.stop()}"
        return s

    yield start
    for s in started:
        s.stop()


def kill9(s: Served) -> None:
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(30)
    assert s.proc.returncode == -signal.SIGKILL


def remote_configs(tmp_path: Path, proxy_url: str, repo: str, digest: str, size: int, *, fill: bool):
    gconf = tmp_path / "overlaybd.json"
    gconf.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
        "download": {"enable": fill, "delay": 0, "delayExtra": 0, "maxMBps": 0},
        "enableAudit": False,
    }))
    layer = tmp_path / "layer0"
    layer.mkdir(exist_ok=True)
    conf = tmp_path / "config.v1.json"
    conf.write_text(json.dumps({"repoBlobUrl": f"{proxy_url}/v2/{repo}/blobs",
                                "lowers": [{"digest": digest, "size": size, "dir": str(layer)}]}))
    return gconf, conf, layer


def present_runs(m: PresenceMap, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for a, b in m.missing_runs(0, size) + [(size, size)]:
        if a > pos:
            out.append((pos, a))
        pos = b
    return out


def assert_present_ranges_correct(layer: Path, blob: bytes) -> list[tuple[int, int]]:
    """Every range the durable map marks present holds the blob's bytes; returns the ranges."""
    m = PresenceMap.load(str(layer / ".download.map"), len(blob))
    assert m is not None
    runs = present_runs(m, len(blob))
    with open(layer / ".download", "rb") as f:
        for a, b in runs:
            f.seek(a)
            assert f.read(b - a) == blob[a:b], f"cached bytes [{a}, {b}) differ from the blob"
    return runs


def gets_after(proxy, start: int) -> list[tuple[int, int]]:
    out = []
    for e in proxy.log[start:]:
        if e.method == "GET" and "Range" in e.headers:
            a, _, b = e.headers["Range"].split("=", 1)[1].partition("-")
            out.append((int(a), int(b) + 1))
    return out


def inside_any(r: tuple[int, int], runs: list[tuple[int, int]]) -> bool:
    return any(a <= r[0] and r[1] <= b for a, b in runs)


def refetched(gets: list[tuple[int, int]], runs: list[tuple[int, int]]) -> int:
    """Bytes of `gets` that fall in the durable `runs` (counted once per request)."""
    return sum(max(0, min(b, gb) - max(a, ga)) for ga, gb in gets for a, b in runs)


async def local_reference(offset: int, length: int) -> bytes:
    img = await open_image(str(L1_CONFIG), GlobalConfig(), read_only=True)
    try:
        buf = bytearray(length)
        await img.read_into(offset, memoryview(buf))
        return bytes(buf)
    finally:
        await img.aclose()


async def read_span(sock: Path, span: int, piece: int = 256 * KiB, parallel: int = 4) -> bytes:
    c = await NBDClient.connect_unix(str(sock))
    try:
        out = bytearray(span)
        sem = asyncio.Semaphore(parallel)

        async def one(off: int):
            async with sem:
                out[off:off + piece] = await c.read(off, piece)

        await asyncio.gather(*(one(o) for o in range(0, span, piece)))
        return bytes(out)
    finally:
        await c.aclose()


def test_kill9_during_background_fill_resumes(tmp_path, registry, fault_proxy, serve, layer32):  # noqa: F811
    blob = layer32[1]
    digest = push_blob(registry.url, "kill/fill", blob)
    proxy = fault_proxy(registry.url)
    slow = proxy.add(Fault(kind="slow", chunk=16 * KiB, delay=0.02, times=-1))
    gconf, conf, layer = remote_configs(tmp_path, proxy.url, "kill/fill", digest, len(blob), fill=True)
    sock = tmp_path / "s.sock"
    s = serve(str(conf), "--global-config", str(gconf), "--read-only", "--nbd", f"unix:{sock}")
    wait_until(lambda: durable_bytes(layer / ".download.map", len(blob)) >= 2 * MiB, 60, "2 MiB filled")
    kill9(s)
    assert slow.hits > 0 and not (layer / "overlaybd.commit").exists()
    runs = assert_present_ranges_correct(layer, blob)
    at_kill = sum(b - a for a, b in runs)
    assert at_kill < len(blob)

    proxy.clear()
    mark = len(proxy.log)
    s2 = serve(str(conf), "--global-config", str(gconf), "--read-only", "--nbd", f"unix:{sock}")
    wait_until(lambda: (layer / "overlaybd.commit").exists(), 60, "the fill to finish and commit")
    assert "sha256:" + hashlib.sha256((layer / "overlaybd.commit").read_bytes()).hexdigest() == digest
    # resumed: nothing that was durable at the kill was asked for again (the fill's endgame
    # may ask twice for what was missing; that is not this test's business)
    after = gets_after(proxy, mark)
    assert after and not [r for r in after if inside_any(r, runs)]
    assert refetched(after, runs) == 0
    assert s2.stop()[0] == 0


async def test_kill9_during_foreground_reads(tmp_path, registry, fault_proxy, serve, layer32):  # noqa: F811
    raw, blob = layer32
    digest = push_blob(registry.url, "kill/read", blob)
    proxy = fault_proxy(registry.url)
    proxy.add(Fault(kind="slow", chunk=16 * KiB, delay=0.02, times=-1))
    gconf, conf, layer = remote_configs(tmp_path, proxy.url, "kill/read", digest, len(blob), fill=False)
    sock = tmp_path / "s.sock"
    s = serve(str(conf), "--global-config", str(gconf), "--read-only", "--nbd", f"unix:{sock}")
    reads = asyncio.ensure_future(read_span(sock, READ_SPAN))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: wait_until(
        lambda: durable_bytes(layer / ".download.map", len(blob)) >= 2 * MiB, 60, "2 MiB read"))
    kill9(s)
    with pytest.raises((NBDClientError, ConnectionError, asyncio.IncompleteReadError)):
        await reads  # the client saw its server die
    runs = assert_present_ranges_correct(layer, blob)
    assert sum(b - a for a, b in runs) < len(blob)

    proxy.clear()
    mark = len(proxy.log)
    serve(str(conf), "--global-config", str(gconf), "--read-only", "--nbd", f"unix:{sock}")
    got = await read_span(sock, READ_SPAN)
    assert got == raw[:READ_SPAN]
    after = gets_after(proxy, mark)
    assert not [r for r in after if inside_any(r, runs)]
    # only the widening of misses to 256 KiB refill units touches durable pages: at most one
    # unit at each edge of each durable range
    assert refetched(after, runs) <= 2 * 256 * KiB * len(runs)


def qemu_io(uri: str, *cmds: str) -> subprocess.Popen:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.Popen(args + [uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def test_kill9_during_writes_keeps_flushed_data_and_drops_torn_tail(tmp_path, serve):
    data, index = tmp_path / "upper.data", tmp_path / "upper.index"
    assert cli_main(["create", str(data), str(index), "1"]) == 0
    conf = tmp_path / "config.v1.json"
    conf.write_text(json.dumps({"lowers": [{"file": str(L1)}], "upper": {"data": str(data), "index": str(index)}}))
    gconf = tmp_path / "overlaybd.json"
    gconf.write_text(json.dumps({"enableAudit": False}))
    sock = tmp_path / "s.sock"
    s = serve(str(conf), "--global-config", str(gconf), "--nbd", f"unix:{sock}")

    # acknowledged and flushed: 1 MiB of 0xab at 32 MiB
    first = qemu_io(s.uri, "write -P 0xab 32M 1M", "flush")
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0 and "Pattern" not in out, out + err
    flushed_records = (index.stat().st_size - lsmt.HT_SIZE) // lsmt.ENTRY_SIZE
    # then a stream of unflushed writes; kill -9 the server in the middle of it
    second = qemu_io(s.uri, *[f"write -P 0x5b {40 * MiB + i * 64 * KiB} 64k" for i in range(1024)])
    wait_until(lambda: (index.stat().st_size - lsmt.HT_SIZE) // lsmt.ENTRY_SIZE >= flushed_records + 8, 60,
               "8 more writes in the upper's log")
    kill9(s)
    second.communicate(timeout=60)
    assert second.returncode != 0  # its server vanished under it

    # tear the data file in the middle of what the last record points at
    isize = index.stat().st_size
    (_, last), = lsmt.iter_entries(index.read_bytes()[isize - isize % 16 - 16:isize - isize % 16])
    torn_at = last.moffset * lsmt.SECTOR + last.length * lsmt.SECTOR // 2 + 100
    os.truncate(data, torn_at)
    torn_off = last.offset * lsmt.SECTOR

    s3 = serve(str(conf), "--global-config", str(gconf), "--nbd", f"unix:{sock}")
    # detected at reopen: the record was cut off the log (and any torn partial record with it)
    assert index.stat().st_size == isize - isize % 16 - 16
    c = await NBDClient.connect_unix(str(sock))
    try:
        assert await c.read(32 * MiB, MiB) == b"\xab" * MiB  # flushed: survived
        # the torn write is gone: its range shows the lower again
        assert await c.read(torn_off, last.length * lsmt.SECTOR) == await local_reference(
            torn_off, last.length * lsmt.SECTOR)
        # the complete unflushed writes before it are still there (the page cache outlived the process)
        assert await c.read(40 * MiB, 64 * KiB) == b"\x5b" * 64 * KiB
    finally:
        await c.aclose()
    # and the layer takes writes again, appended after the dropped tail
    w = qemu_io(s3.uri, "write -P 0xcd 48M 64k", "flush", "read -P 0xcd 48M 64k", "read -P 0xab 32M 1M")
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0 and "Pattern verification failed" not in out, out + err
