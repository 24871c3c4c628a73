"""ZFile: damaged files end in FormatError/ChecksumError, never a crash or a giant allocation.

Seeds: files written by upstream's tools (LZ4 and zstd, with and without block CRCs, header
overwritten or not) and by our writer. Checksums are optionally recomputed after the damage,
so the mutations reach the checks behind them (index bounds, block decoding) instead of all
stopping at the digest.
"""

from __future__ import annotations

import asyncio
import functools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_obd.errors import FormatError, ObdError
from tcmu_obd.format import zfile as zf
from tcmu_obd.format.crc import crc32c_raw
from tcmu_obd.image.source import BytesSource
from tcmu_obd.image.zfile_source import ZFileSource
from tests.support.paths import FIXTURES_OBD

from .mutate import Seed, allocation_limit, fuzz_settings, mutants, only, u32le, u64le

HS = zf.HEADER_SIZE
# offsets inside a 512-byte area (struct "<8s16sIIQQQQIIIBBBBIIB")
FLAGS, INDEX_OFFSET, INDEX_SIZE, ORIGINAL, INDEX_CRC, BLOCK_SIZE, ALGO, DICT_SIZE, VERIFY = (
    32, 40, 48, 56, 64, 72, 76, 84, 88)


def _area_fields(base: int) -> list:
    return [u64le(base + FLAGS), u64le(base + INDEX_OFFSET), u64le(base + INDEX_SIZE), u64le(base + ORIGINAL),
            u32le(base + BLOCK_SIZE), (base + ALGO, 1, "<"), u32le(base + DICT_SIZE), (base + VERIFY, 1, "<")]


@functools.lru_cache(maxsize=None)
def _seeds() -> tuple[bytes, ...]:
    d = FIXTURES_OBD / "zfile" / "compressed"
    layers = FIXTURES_OBD / "pattern" / "layers"
    own = bytes(range(256)) * 40 + b"\0" * 5000
    return (
        (d / "tiny.lz4.zfile").read_bytes(),
        (d / "empty.zstd.zfile").read_bytes(),
        (layers / "P2.lz4.zfile").read_bytes(),
        (layers / "P2.zstd.zfile").read_bytes(),
        zf.compress_bytes(own, "zstd", 4096, verify=False, overwrite_header=False),
        zf.compress_bytes(own, "lz4", 8192, verify=True, overwrite_header=True),
    )


def _seed(seed: bytes) -> Seed:
    n = len(seed)
    h = zf.parse_header_trailer(seed[:HS])
    t = zf.parse_header_trailer(seed[n - HS:])
    info = h if h.header_overwrite else t
    fields = _area_fields(0) + _area_fields(n - HS)
    fields += [u32le(info.index_offset + 4 * k) for k in range(min(info.index_size, 6))]
    hot = [(24, 96), (n - HS + 24, n - HS + 96), (HS, min(n, HS + 64)),
           (info.index_offset, info.index_offset + 4 * min(info.index_size, 16))]
    return Seed(seed, fields, hot)


SEEDS = [_seed(s) for s in _seeds()]


def refix_checksums(blob: bytes) -> bytes:
    """Recompute header/trailer digests and the index CRC, wherever they can be located."""
    b = bytearray(blob)
    if len(b) < HS or not zf.is_zfile(b):
        return blob
    areas = [0] + ([len(b) - HS] if len(b) >= 2 * HS and zf.is_zfile(b[len(b) - HS:]) else [])
    for base in areas:
        (flags,) = struct.unpack_from("<Q", b, base + FLAGS)
        off, cnt = struct.unpack_from("<QQ", b, base + INDEX_OFFSET)
        if flags & zf.FLAG_DIGEST and cnt < (1 << 20) and off + 4 * cnt <= len(b):
            struct.pack_into("<I", b, base + INDEX_CRC, crc32c_raw(bytes(b[off:off + 4 * cnt])))
        if flags & zf.FLAG_DIGEST:
            area = bytearray(b[base:base + HS])
            area[28:32] = bytes(4)
            struct.pack_into("<I", b, base + 28, crc32c_raw(bytes(area)))
    return bytes(b)


@fuzz_settings(300)
@given(mutants(SEEDS), st.booleans())
def test_damaged_zfile(case, refix):
    i, blob = case
    if refix:
        blob = refix_checksums(blob)
    out, _ = only((FormatError,), zf.decompress_bytes, blob, source="fuzz")
    if out is not None:  # accepted: then it decodes to exactly the size the index info promised
        header = zf.parse_header_trailer(blob[:HS])
        info = header if header.header_overwrite else zf.parse_header_trailer(blob[-HS:])
        assert len(out) == info.original_file_size


@fuzz_settings(120)
@given(mutants(SEEDS), st.booleans())
def test_damaged_zfile_source_reads(case, refix):
    """The streaming reader (index load, batched block reads) over the same damage."""
    _, blob = case
    if refix:
        blob = refix_checksums(blob)

    async def go():
        src = await ZFileSource.open(BytesSource(blob, name="fuzz"))
        try:
            buf = bytearray(min(src.size, 1 << 20))
            await src.read_into(0, memoryview(buf))
        finally:
            await src.aclose()

    only((ObdError,), asyncio.run, go())


@pytest.mark.parametrize("claimed", [1 << 30, 1 << 40, (1 << 64) - 1])
def test_huge_index_size_is_rejected_before_reading(claimed):
    """An index_size of 2^40 blocks is refused against the blob size, not allocated."""
    seed = _seeds()[5]  # header overwritten: the header carries the index info
    b = bytearray(seed)
    struct.pack_into("<Q", b, INDEX_SIZE, claimed)
    blob = refix_checksums(bytes(b))
    with allocation_limit(256 << 10):
        with pytest.raises(FormatError, match="index"):
            zf.decompress_bytes(blob)
        with pytest.raises(FormatError, match="index"):
            asyncio.run(ZFileSource.open(BytesSource(blob)))


@fuzz_settings(100)
@given(st.sampled_from([zf.ALGO_LZ4, zf.ALGO_ZSTD]), st.booleans(), st.binary(max_size=64),
       st.integers(1, 4096))
def test_decode_block_garbage(algo, verify, payload, expected):
    stored = payload + struct.pack("<I", crc32c_raw(payload, 100007)) if verify else payload
    only((FormatError,), zf.decode_block, stored, algo=algo, verify=verify, block_size=4096,
         expected_len=expected)
