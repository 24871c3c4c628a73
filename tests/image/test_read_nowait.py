"""Image.read_into_nowait, the synchronous read of cached/local data: same bytes and errors as
the async path in every layer kind and stack, and a decline (False) whenever data would need
a wait. Reference bytes are the upstream-made raw disk of the pattern fixtures."""

from __future__ import annotations

import random
import shutil

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import ImageIOError
from tcmu_obd.format.lsmt import Mapping, SegmentMap
from tcmu_obd.frontends.tcmu import scsi
from tcmu_obd.frontends.tcmu.commands import CommandProcessor, IoPolicy, Response
from tcmu_obd.frontends.tcmu.scsi import DeviceInfo, ScsiStatus
from tcmu_obd.image.source import BytesSource, FileSource, SliceSource, nowait_reader
from tcmu_obd.image.stack import open_image
from tests.support.paths import FIXTURES_OBD

PATTERN = FIXTURES_OBD / "pattern"
P12_CONFIGS = ["p12.lsmt", "p12.lz4.zfile", "p12.zstd.zfile", "p1+rw-p2"]


@pytest.fixture(scope="module")
def p12_raw() -> bytes:
    with open(PATTERN / "expected" / "raw.p12.img.zst", "rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


class AsyncOnly:
    """A source that always waits (a remote blob's shape): no read_into_nowait."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.reads = 0

    async def read_into(self, offset, buf):
        self.reads += 1
        await self.inner.read_into(offset, buf)

    async def aclose(self):
        await self.inner.aclose()


def _ranges(image, seed: int = 7) -> list[tuple[int, int]]:
    """Ranges of every shape: each extent whole and across its edges, then random 4 KiB,
    multi-extent and unaligned reads."""
    out = []
    for e in image.extents(0, image.size):
        out.append((e.offset, min(e.length, 256 << 10)))
        if e.offset >= 4096:
            out.append((e.offset - 4096, 8192))  # straddles the previous extent
    rnd = random.Random(seed)
    for _ in range(150):
        out.append((rnd.randrange(image.size // 4096) * 4096, 4096))
    for _ in range(60):
        n = rnd.choice([512, 1536, 64 << 10, 300 << 10])
        out.append((rnd.randrange((image.size - n) // 512) * 512, n))
    for _ in range(40):
        n = rnd.randrange(1, 20000)
        out.append((rnd.randrange(image.size - n), n))
    return out


@pytest.mark.parametrize("config", P12_CONFIGS)
async def test_nowait_gives_the_same_bytes_as_the_disk(config, p12_raw):
    image = await open_image(PATTERN / "configs" / f"{config}.config.v1.json", read_only=True)
    try:
        kinds = {e.kind for e in image.extents(0, image.size)}
        assert {"data", "hole"} <= kinds  # the fixture exercises holes and data
        for off, n in _ranges(image):
            buf = bytearray(n)
            if not image.read_into_nowait(off, memoryview(buf)):
                # only a cold ZFile block may need the async path, and that fills the cache
                assert "zfile" in config
                await image.read_into(off, memoryview(buf))
                assert buf == p12_raw[off:off + n], (off, n)
                buf = bytearray(n)
                assert image.read_into_nowait(off, memoryview(buf)), (off, n)
            assert buf == p12_raw[off:off + n], (off, n)
    finally:
        await image.aclose()


async def test_nowait_declines_for_a_source_that_must_wait_and_async_path_fills(p12_raw):
    image = await open_image(PATTERN / "configs" / "p12.lsmt.config.v1.json", read_only=True)
    try:
        for layer in image.lowers:
            layer.source = AsyncOnly(layer.source)  # swapped after open, as trace recording does
        exts = image.extents(0, image.size)
        data = next(e for e in exts if e.kind == "data")
        hole = next(e for e in exts if e.kind == "hole")
        buf = bytearray(4096)
        assert not image.read_into_nowait(data.offset, memoryview(buf))
        assert image.read_into_nowait(hole.offset, memoryview(buf))  # a hole never waits
        assert buf == bytes(4096)
        # a read over both a hole and data declines as a whole
        span = bytearray(data.offset - hole.offset + 512) if hole.offset < data.offset else None
        if span is not None:
            assert not image.read_into_nowait(hole.offset, memoryview(span))
        reads = sum(layer.source.reads for layer in image.lowers)
        await image.read_into(data.offset, memoryview(buf))
        assert buf == p12_raw[data.offset:data.offset + 4096]
        assert sum(layer.source.reads for layer in image.lowers) == reads + 1
    finally:
        await image.aclose()


@pytest.mark.parametrize("config", ["p12.lz4.zfile", "p12.zstd.zfile"])
async def test_zfile_declines_until_decoded(config, p12_raw):
    image = await open_image(PATTERN / "configs" / f"{config}.config.v1.json", read_only=True)
    try:
        data = next(e for e in image.extents(0, image.size) if e.kind == "data")
        zsrcs = [layer.unwrapped.zfile for layer in image.lowers]
        misses = sum(z.cache_misses for z in zsrcs)
        buf = bytearray(4096)
        assert not image.read_into_nowait(data.offset, memoryview(buf))
        assert sum(z.cache_misses for z in zsrcs) == misses  # declining fetched nothing
        await image.read_into(data.offset, memoryview(buf))
        assert sum(z.cache_misses for z in zsrcs) > misses
        buf = bytearray(4096)
        assert image.read_into_nowait(data.offset, memoryview(buf))
        assert buf == p12_raw[data.offset:data.offset + 4096]
    finally:
        await image.aclose()


async def test_upper_writes_and_discards_read_back_through_nowait(tmp_path, p12_raw):
    group = tmp_path / "pattern"
    shutil.copytree(PATTERN, group)
    for p in group.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    model = bytearray(p12_raw)
    image = await open_image(group / "configs" / "p1+rw-p2.config.v1.json")
    try:
        rnd = random.Random(3)
        for k in range(30):
            off = rnd.randrange(image.size - 70000)
            n = rnd.randrange(1, 70000)
            if k % 3 == 2:
                await image.discard(off, n)
                model[off:off + n] = bytes(n)
            else:
                data = rnd.randbytes(n)
                await image.write(off, data)
                model[off:off + n] = data
        for off, n in _ranges(image, seed=11):
            buf = bytearray(n)
            assert image.read_into_nowait(off, memoryview(buf)), (off, n)
            assert buf == model[off:off + n], (off, n)
    finally:
        await image.aclose()


async def test_nowait_errors_match_read_into():
    image = await open_image(PATTERN / "configs" / "p12.lsmt.config.v1.json", read_only=True)
    try:
        with pytest.raises(ImageIOError, match="outside disk"):
            image.read_into_nowait(image.size - 512, memoryview(bytearray(1024)))
        assert image.read_into_nowait(image.size, memoryview(bytearray(0)))
        data = next(e for e in image.extents(0, image.size) if e.kind == "data")
        await image.lowers[-1].source.aclose()  # its fd is gone: the read must fail, named
        await image.lowers[0].source.aclose()
        with pytest.raises(ImageIOError, match="P[12].lsmt: read at"):
            image.read_into_nowait(data.offset, memoryview(bytearray(4096)))
    finally:
        await image.aclose()


def test_nowait_reader_skips_subclasses_that_change_read_into():
    class Counting(BytesSource):
        async def read_into(self, offset, buf):
            await super().read_into(offset, buf)

    class Fast(Counting):
        def read_into_nowait(self, offset, buf):
            return False

    assert nowait_reader(BytesSource(b"x" * 512)) is not None
    assert nowait_reader(Counting(b"x" * 512)) is None  # its read_into would be bypassed
    assert nowait_reader(Fast(b"x" * 512)) is not None
    patched = BytesSource(b"x" * 512)
    patched.read_into = Counting(b"y" * 512).read_into
    assert nowait_reader(patched) is None
    assert nowait_reader(AsyncOnly(patched)) is None


async def test_slice_and_file_sources_read_nowait(tmp_path):
    blob = bytes(range(256)) * 64
    path = tmp_path / "blob"
    path.write_bytes(blob)
    for inner in (BytesSource(blob), FileSource(path)):
        sl = SliceSource(inner, 1000, 9000)  # a tar payload's window
        buf = bytearray(3000)
        assert sl.read_into_nowait(500, memoryview(buf))
        assert buf == blob[1500:4500]
        with pytest.raises(ImageIOError, match="past end"):
            sl.read_into_nowait(8000, memoryview(buf))
        await inner.aclose()
    waiting = SliceSource(AsyncOnly(BytesSource(blob)), 1000, 9000)
    assert not waiting.read_into_nowait(0, memoryview(bytearray(512)))
    big = FileSource(path)
    big.offload_bytes = 4096  # bigger reads go to a thread: the fast path leaves them alone
    assert not big.read_into_nowait(0, memoryview(bytearray(8192)))
    await big.aclose()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40), st.booleans()), max_size=12),
       st.integers(0, 260), st.integers(1, 60))
def test_segment_map_covering_agrees_with_lookup(maps, offset, length):
    sm = SegmentMap(Mapping(o, n, 1000 + o, z) for o, n, z in maps)
    pieces = sm.lookup(offset, length)
    got = sm.covering(offset, length)
    if len(pieces) > 1:
        assert got is False
    elif pieces[0][2] is None:
        assert got is None
    else:
        m = pieces[0][2]
        assert got is not None and got is not False
        assert got.slice(offset, offset + length) == m


# -- the TCMU frontend tries the fast path before the coroutine -----------------------------


def _read10(lba: int, n: int):
    class Cmd:
        cdb = bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0]) + n.to_bytes(2, "big") + bytes([0])
        data_length = n * 512

        def read_data_out(self, length):
            raise AssertionError("a READ has no data-out")

    return Cmd()


async def test_tcmu_read_of_cached_zfile_data_is_answered_in_submit(p12_raw):
    image = await open_image(PATTERN / "configs" / "p12.zstd.zfile.config.v1.json", read_only=True)
    try:
        info = DeviceInfo(num_lbas=image.size // 512, read_only=True, wwn="abc", cfgstring="overlaybd//x")
        # short budget: the closed-source failure below is EIO, retried until the budget ends
        proc = CommandProcessor(image, info, IoPolicy(read_timeout=0.3, write_timeout=5.0))
        data = next(e for e in image.extents(0, image.size) if e.kind == "data")
        lba = data.offset // 512
        cold = proc.submit(_read10(lba, 8))
        assert not isinstance(cold, Response)  # needs a fetch: a coroutine for a task
        r = await cold
        assert r.status == ScsiStatus.GOOD and r.data == p12_raw[data.offset:data.offset + 4096]
        warm = proc.submit(_read10(lba, 8))
        assert isinstance(warm, Response) and warm.data == p12_raw[data.offset:data.offset + 4096]
        for layer in image.lowers:  # a failing fast path still ends as a MEDIUM ERROR
            await layer.unwrapped.zfile.aclose()
        failed = proc.submit(_read10(lba, 8))
        r = failed if isinstance(failed, Response) else await failed
        assert r.status == ScsiStatus.CHECK_CONDITION
        assert scsi.parse_sense(r.sense) == scsi.UNRECOVERED_READ_ERROR
    finally:
        await image.aclose()
