"""ZFileSource: decompressed view of a ZFile over any BlobSource."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import ChecksumError, FormatError, ImageIOError
from tcmu_obd.format import tar
from tcmu_obd.format import zfile as zf
from tcmu_obd.image.source import BytesSource, FileSource, SliceSource, read_exact
from tcmu_obd.image.zfile_source import ZFileSource
from tests.support.paths import FIXTURES_OBD, FIXTURES_UPSTREAM

EXPECTED = json.loads((FIXTURES_OBD / "expected.json").read_text())
HELLO = FIXTURES_UPSTREAM / "hello-world-oci" / "hello-world"


async def open_blob(inner):
    """tar → zfile, as the layer opener does."""
    head = await read_exact(inner, 0, min(inner.size, tar.DETECT_BYTES))
    p = tar.detect(head, blob_size=inner.size, source=inner.name)
    if p is not None:
        inner = SliceSource(inner, p.offset, p.size)
    return await ZFileSource.open(inner)


async def sha_of(src, chunk: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    off = 0
    while off < src.size:
        n = min(chunk, src.size - off)
        mv = memoryview(buf)[:n]
        await src.read_into(off, mv)
        h.update(mv)
        off += n
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(EXPECTED["zfile"]))
@pytest.mark.parametrize("chunk", [1 << 20, 100003, 4096])
async def test_fixture_zfiles(name, chunk):
    case = EXPECTED["zfile"][name]
    z = await open_blob(FileSource(FIXTURES_OBD / "zfile" / name))
    try:
        assert z.size == case["plain_size"]
        assert await sha_of(z, chunk) == case["plain_sha256"]
    finally:
        await z.aclose()


@pytest.mark.parametrize("name", sorted(EXPECTED["ext4-chain"]["zfile_decoded_sha256"]))
async def test_chain_layers_decode_to_lsmt(name):
    z = await open_blob(FileSource(FIXTURES_OBD / "ext4-chain" / name))
    try:
        assert await sha_of(z, 1 << 20) == EXPECTED["ext4-chain"]["zfile_decoded_sha256"][name]
    finally:
        await z.aclose()


async def test_upstream_ext4_64_2021_zfile(tmp_path):
    with tarfile.open(FIXTURES_UPSTREAM / "ext4_64.tar.gz") as tf:
        tf.extract("ext4_64", tmp_path, filter="data")
    z = await open_blob(FileSource(tmp_path / "ext4_64"))
    try:
        # 2021 layout: header not overwritten, no digest, garbage in the header's index fields
        assert not z.header.header_overwrite and not z.header.has_digest
        assert z.trailer is not None and z.trailer.flags == 0x06
        assert z.jump_table.n_blocks == 132309 and z.trailer.index_offset == 4207947
        assert z.size == 541937664
        digest = await sha_of(z, 4 << 20)
        assert digest.startswith("799dbd74") and digest.endswith("5ac7")
    finally:
        await z.aclose()


def hello_layer():
    index = json.loads((HELLO / "index.json").read_text())
    (entry,) = [m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "amd64-converted"]
    manifest = json.loads((HELLO / "blobs/sha256" / entry["digest"].split(":")[1]).read_text())
    (layer,) = manifest["layers"]
    return HELLO / "blobs/sha256" / layer["digest"].split(":")[1]


async def test_upstream_hello_world_layer():
    z = await open_blob(FileSource(hello_layer()))
    try:
        assert z.header.flags == 0x1B and z.jump_table.n_blocks == 17463
        assert z.size == 71528448
        digest = await sha_of(z, 4 << 20)
        assert digest.startswith("39195424") and digest.endswith("c2ea")
    finally:
        await z.aclose()


# -- reads at any offset -------------------------------------------------------------------


class CountingSource(BytesSource):
    """BytesSource that records every read and can corrupt the first n reads."""

    def __init__(self, data, name="mem.zfile", corrupt_reads=0, corrupt_at=None):
        super().__init__(data, name)
        self.reads: list[tuple[int, int]] = []
        self.corrupt_reads = corrupt_reads
        self.corrupt_at = corrupt_at
        self.closed = False

    async def read_into(self, offset, buf):
        await super().read_into(offset, buf)
        self.reads.append((offset, len(buf)))
        if self.corrupt_reads and self.corrupt_at is not None and offset <= self.corrupt_at < offset + len(buf):
            self.corrupt_reads -= 1
            buf[self.corrupt_at - offset] ^= 0xFF

    async def aclose(self):
        self.closed = True


def sample(n: int, seed: int = 1) -> bytes:
    rnd = hashlib.sha256(b"%d" % seed).digest()
    out = bytearray()
    i = 0
    while len(out) < n:  # alternate random, zero and text runs
        kind = i % 3
        if kind == 0:
            out += hashlib.sha256(rnd + b"%d" % i).digest() * 50
        elif kind == 1:
            out += bytes(3000)
        else:
            out += b"text %d " % i * 100
        i += 1
    return bytes(out[:n])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    head=st.binary(max_size=6000),
    size=st.integers(0, 70000),
    algo=st.sampled_from(["lz4", "zstd"]),
    bs=st.sampled_from([4096, 8192, 16384]),
    verify=st.booleans(),
    cache=st.sampled_from([0, 8192, 1 << 20]),
    reads=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 40000)), min_size=1, max_size=12),
)
def test_random_reads_equal_plain(head, size, algo, bs, verify, cache, reads):
    data = head + sample(size, seed=size)
    size = len(data)
    blob = zf.compress_bytes(data, algo, bs, verify, overwrite_header=bool(size % 2))

    async def run():
        z = await ZFileSource.open(BytesSource(blob), cache_bytes=cache)
        assert z.size == size
        for frac, length in reads:
            off = int(frac * size)
            length = min(length, size - off)
            buf = bytearray(length)
            await z.read_into(off, memoryview(buf))
            assert bytes(buf) == data[off:off + length]
            assert z.cached_bytes <= cache
        await z.aclose()

    asyncio.run(run())


async def test_coalesced_single_inner_read():
    data = sample(200_000)
    inner = CountingSource(zf.compress_bytes(data, "lz4"))
    z = await ZFileSource.open(inner, cache_bytes=0)
    inner.reads.clear()
    buf = bytearray(40 * 4096)
    await z.read_into(3 * 4096 + 7, memoryview(buf))
    assert bytes(buf) == data[3 * 4096 + 7:3 * 4096 + 7 + len(buf)]
    assert len(inner.reads) == 1  # 41 blocks, one read of their stored bytes
    off, ln = inner.reads[0]
    first, _ = z.jump_table.block_range(3)
    last_off, last_len = z.jump_table.block_range(43)
    assert (off, ln) == (first, last_off + last_len - first)


async def test_lru_hits_and_bound():
    data = sample(100_000)
    inner = CountingSource(zf.compress_bytes(data, "zstd"))
    z = await ZFileSource.open(inner, cache_bytes=5 * 4096)
    inner.reads.clear()
    buf = bytearray(100)
    await z.read_into(10, memoryview(buf))
    await z.read_into(200, memoryview(buf))
    assert len(inner.reads) == 1 and z.cache_hits == 1 and z.cache_misses == 1
    big = bytearray(len(data))
    await z.read_into(0, memoryview(big))
    assert bytes(big) == data
    assert z.cached_bytes <= 5 * 4096
    # the most recent blocks are the ones kept
    inner.reads.clear()
    await z.read_into(len(data) - 10, memoryview(bytearray(10)))
    assert inner.reads == []


async def test_large_read_goes_through_executor_and_matches(monkeypatch):
    from tcmu_obd.image import zfile_source

    used = []
    real = zfile_source._decode_executor

    def counting():
        used.append(1)
        return real()

    monkeypatch.setattr(zfile_source, "_decode_executor", counting)
    data = sample(3 << 20)
    z = await ZFileSource.open(BytesSource(zf.compress_bytes(data, "lz4")), cache_bytes=0)
    z.read_batch_bytes = 64 << 10  # many batches, fetched concurrently
    buf = bytearray(len(data) - 5)
    await z.read_into(5, memoryview(buf))
    assert bytes(buf) == data[5:]
    assert used  # batches of ~64 KiB stored hold more than inline_decode_bytes of output
    used.clear()
    small = bytearray(5000)
    await z.read_into(12345, memoryview(small))
    assert bytes(small) == data[12345:17345]
    assert not used  # small reads decode on the loop


async def test_read_bounds():
    z = await ZFileSource.open(BytesSource(zf.compress_bytes(b"abc" * 1000, "lz4")))
    await z.read_into(3000, memoryview(bytearray(0)))
    with pytest.raises(ImageIOError):
        await z.read_into(2999, memoryview(bytearray(2)))
    with pytest.raises(ImageIOError):
        await z.read_into(-1, memoryview(bytearray(1)))


async def test_empty_zfile():
    z = await ZFileSource.open(FileSource(FIXTURES_OBD / "zfile/compressed/empty.zstd.zfile"))
    assert z.size == 0 and z.jump_table.n_blocks == 0
    await z.read_into(0, memoryview(bytearray(0)))
    await z.aclose()


async def test_aclose_closes_inner():
    inner = CountingSource(zf.compress_bytes(b"x" * 5000, "lz4"))
    z = await ZFileSource.open(inner)
    await z.aclose()
    assert inner.closed


# -- bad input ------------------------------------------------------------------------------


async def test_block_crc_error_names_block_and_offset_after_one_retry():
    data = sample(50_000)
    blob = bytearray(zf.compress_bytes(data, "lz4"))
    probe = await ZFileSource.open(BytesSource(bytes(blob)))
    off, ln = probe.jump_table.block_range(5)
    blob[off + 2] ^= 0x10
    z = await ZFileSource.open(BytesSource(bytes(blob), name="bad-block.zfile"))
    with pytest.raises(ChecksumError) as ei:
        await z.read_into(5 * 4096 + 100, memoryview(bytearray(10)))
    e = ei.value
    assert e.source == "bad-block.zfile" and e.offset == off and "block 5" in str(e)
    assert z.retries == 1
    # other blocks still read
    buf = bytearray(4096)
    await z.read_into(0, memoryview(buf))
    assert bytes(buf) == data[:4096]


async def test_transient_corruption_recovered_by_retry():
    data = sample(50_000)
    blob = zf.compress_bytes(data, "zstd")
    probe = await ZFileSource.open(BytesSource(blob))
    off, _ = probe.jump_table.block_range(2)
    inner = CountingSource(blob, corrupt_reads=1, corrupt_at=off + 1)
    z = await ZFileSource.open(inner)
    buf = bytearray(3 * 4096)
    await z.read_into(4096, memoryview(buf))
    assert bytes(buf) == data[4096:4 * 4096]
    assert z.retries == 1


async def test_nocrc_corruption_is_format_error_or_wrong_bytes_never_crash():
    data = sample(30_000)
    blob = bytearray(zf.compress_bytes(data, "zstd", verify=False))
    blob[600] ^= 0xFF
    z = await ZFileSource.open(BytesSource(bytes(blob), name="nocrc"))
    try:
        await z.read_into(0, memoryview(bytearray(4096)))
    except FormatError as e:
        assert e.source == "nocrc" and "block 0" in str(e)


@pytest.mark.parametrize("blob,match", [
    (b"", "too small"),
    (b"\0" * 511, "too small"),
    (b"\0" * 4096, "bad magic"),
    (b"LSMT\x00\x01\x02\x00" + bytes(8000), "bad magic"),
])
async def test_not_a_zfile(blob, match):
    with pytest.raises(FormatError, match=match) as ei:
        await ZFileSource.open(BytesSource(blob, name="thing.bin"))
    assert ei.value.source == "thing.bin" and ei.value.offset is not None


@pytest.mark.parametrize("overwrite", [True, False])
async def test_truncated_files(overwrite):
    data = sample(60_000)
    blob = zf.compress_bytes(data, "lz4", overwrite_header=overwrite)
    t = zf.parse_header_trailer(blob[-512:])
    # cut inside the data, inside the index, inside the trailer
    cuts = [700, t.index_offset + 3, 600]
    if not overwrite:
        cuts.append(len(blob) - 100)  # trailer damaged: only fatal when the header needs it
    for cut in cuts:
        with pytest.raises(FormatError) as ei:
            await ZFileSource.open(BytesSource(blob[:cut], name="cut.zfile"))
        assert ei.value.source == "cut.zfile"


async def test_trailer_missing_only_is_fine_with_overwritten_header():
    data = sample(20_000)
    blob = zf.compress_bytes(data, "lz4")
    z = await ZFileSource.open(BytesSource(blob[:-512]))
    buf = bytearray(len(data))
    await z.read_into(0, memoryview(buf))
    assert bytes(buf) == data


async def test_absurd_index_size_no_giant_allocation():
    blob = bytearray(zf.compress_bytes(sample(20_000), "lz4"))
    h = zf.parse_header_trailer(blob[:512])
    for n, match in ((2**40, "exceeds"), (10**9, "does not fit")):
        from dataclasses import replace

        blob[:512] = zf.build_header_trailer(replace(h, index_size=n, original_file_size=n * 4096))
        with pytest.raises(FormatError, match=match):
            await ZFileSource.open(BytesSource(bytes(blob), name="huge.zfile"))


async def test_header_and_index_corruption():
    from dataclasses import replace

    blob = bytearray(zf.compress_bytes(sample(20_000), "lz4", overwrite_header=False))
    bad = bytearray(blob)
    bad[40] ^= 1
    with pytest.raises(ChecksumError, match="header digest"):
        await ZFileSource.open(BytesSource(bytes(bad), name="h"))
    bad = bytearray(blob)
    bad[-20] ^= 1
    with pytest.raises(ChecksumError, match="trailer digest"):
        await ZFileSource.open(BytesSource(bytes(bad), name="t"))
    t = zf.parse_header_trailer(blob[-512:])
    bad = bytearray(blob)
    bad[t.index_offset + 1] ^= 1
    with pytest.raises(ChecksumError, match="index CRC") as ei:
        await ZFileSource.open(BytesSource(bytes(bad), name="i"))
    assert ei.value.offset == t.index_offset
    # unknown algorithm, properly signed
    bad = bytearray(blob)
    bad[:512] = zf.build_header_trailer(replace(zf.parse_header_trailer(blob[:512]), algo=0))
    with pytest.raises(FormatError, match="unsupported"):
        await ZFileSource.open(BytesSource(bytes(bad), name="a"))
    # trailer not sealed
    bad = bytearray(blob)
    bad[-512:] = zf.build_header_trailer(replace(t, flags=0x12))
    with pytest.raises(FormatError, match="not sealed"):
        await ZFileSource.open(BytesSource(bytes(bad), name="s"))


# -- shared in-flight batches ----------------------------------------------------------------


class GatedSource(CountingSource):
    """Reads past the header area wait until `gate` is set (an Event, not a sleep)."""

    def __init__(self, data, **kw):
        super().__init__(data, **kw)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.gated = False

    async def read_into(self, offset, buf):
        if self.gated:
            self.started.set()
            await self.gate.wait()
        await super().read_into(offset, buf)


async def _gated(data):
    inner = GatedSource(zf.compress_bytes(data, "lz4"))
    z = await ZFileSource.open(inner)
    inner.reads.clear()
    inner.gated = True
    return inner, z


async def test_concurrent_reads_share_one_fetch():
    data = sample(64 * 1024)
    inner, z = await _gated(data)
    bufs = [bytearray(9000) for _ in range(3)]
    tasks = [asyncio.create_task(z.read_into(100 + 50 * k, memoryview(b))) for k, b in enumerate(bufs)]
    await inner.started.wait()
    inner.gate.set()
    await asyncio.gather(*tasks)
    for k, b in enumerate(bufs):
        assert bytes(b) == data[100 + 50 * k:100 + 50 * k + 9000]
    assert len(inner.reads) == 1


async def test_cancelled_reader_does_not_cancel_shared_fetch():
    data = sample(64 * 1024)
    inner, z = await _gated(data)
    a, b = bytearray(4096), bytearray(4096)
    # Tasks run in creation order: ta starts the batch and blocks at the gate, then tb joins
    # it, and only then does this test wake up from started.wait().
    ta = asyncio.create_task(z.read_into(8192, memoryview(a)))
    tb = asyncio.create_task(z.read_into(8192, memoryview(b)))
    await inner.started.wait()
    assert len({t for t, _ in z._inflight.values()}) == 1
    ta.cancel()
    inner.gate.set()
    await tb
    assert ta.cancelled()
    assert bytes(b) == data[8192:12288]
    assert len(inner.reads) == 1
    inner.reads.clear()
    await z.read_into(8192, memoryview(a))  # served from the LRU
    assert inner.reads == [] and bytes(a) == bytes(b)


async def test_cancelled_sole_reader_still_fills_cache():
    data = sample(64 * 1024)
    inner, z = await _gated(data)
    a = bytearray(4096)
    ta = asyncio.create_task(z.read_into(0, memoryview(a)))
    await inner.started.wait()
    ta.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ta
    (batch_task,) = {t for t, _ in z._inflight.values()}
    inner.gate.set()
    await batch_task  # its cache-filling done-callback was added first, so it ran first
    inner.reads.clear()
    await z.read_into(0, memoryview(a))
    assert inner.reads == [] and bytes(a) == data[:4096]


async def test_shared_fetch_error_reaches_every_reader():
    data = sample(64 * 1024)
    blob = bytearray(zf.compress_bytes(data, "lz4"))
    probe = await ZFileSource.open(BytesSource(bytes(blob)))
    off, _ = probe.jump_table.block_range(1)
    blob[off] ^= 0xFF
    inner = GatedSource(bytes(blob), name="shared-bad")
    z = await ZFileSource.open(inner)
    inner.gated = True
    tasks = [asyncio.create_task(z.read_into(4096, memoryview(bytearray(10)))) for _ in range(2)]
    await inner.started.wait()
    inner.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ChecksumError) and "block 1" in str(r) for r in results)
    assert z._inflight == {}


async def test_aclose_cancels_inflight():
    data = sample(64 * 1024)
    inner, z = await _gated(data)
    ta = asyncio.create_task(z.read_into(0, memoryview(bytearray(4096))))
    await inner.started.wait()
    await z.aclose()
    assert inner.closed and z._inflight == {}
    with pytest.raises(ImageIOError, match="source closed"):
        await ta
    with pytest.raises(ImageIOError, match="after close"):
        await z.read_into(0, memoryview(bytearray(1)))
