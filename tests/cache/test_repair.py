"""cache/repair.py: which ranges of a blob to refetch after a digest mismatch."""

from __future__ import annotations

import random

from tcmu_obd.cache.repair import locate_damage
from tcmu_obd.format import tar as tarfmt
from tcmu_obd.format import zfile as zf


def _zfile(verify: bool = True) -> bytes:
    r = random.Random(1)
    raw = b"".join(r.randbytes(2048) + bytes(2048) for _ in range(64))
    return zf.compress_bytes(raw, "lz4", 4096, verify=verify)


def _blocks(blob: bytes, base: int = 0) -> zf.JumpTable:
    h = zf.parse_header_trailer(blob[base:base + zf.HEADER_SIZE])
    start = base + h.index_offset
    return zf.JumpTable.from_index(blob[start:start + 4 * h.index_size], h)


def _flip(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


def _locate(tmp_path, blob: bytes):
    p = tmp_path / "blob"
    p.write_bytes(blob)
    return locate_damage(str(p), len(blob))


def test_names_the_pages_of_the_block_whose_crc_fails(tmp_path):
    blob = _zfile()
    jt = _blocks(blob)
    off, ln = jt.block_range(40)
    got = _locate(tmp_path, _flip(blob, off + 3))
    assert got == [(off // 4096 * 4096, -(-(off + ln) // 4096) * 4096)]
    # two blocks far apart: two ranges
    off5, _ = jt.block_range(5)
    got = _locate(tmp_path, _flip(_flip(blob, off + 3), off5 + 1))
    assert len(got) == 2 and got[0][0] <= off5 < got[0][1] and got[1][0] <= off < got[1][1]


def test_inside_a_tar_wrapper_ranges_are_blob_offsets(tmp_path):
    blob = _zfile()
    src = tmp_path / "z"
    src.write_bytes(blob)
    from tcmu_obd.tools.zfile import tar_wrap_file

    tar_wrap_file(src, tmp_path / "t")
    wrapped = (tmp_path / "t").read_bytes()
    base = tarfmt.detect(wrapped[:tarfmt.DETECT_BYTES], blob_size=len(wrapped)).offset
    off, _ = _blocks(wrapped, base).block_range(7)
    got = _locate(tmp_path, _flip(wrapped, base + off + 1))
    assert got is not None and len(got) == 1 and got[0][0] <= base + off < got[0][1]


def test_cannot_locate_returns_none(tmp_path):
    blob = _zfile()
    assert _locate(tmp_path, blob) is None  # every CRC fine: the wrong byte is elsewhere
    assert _locate(tmp_path, _flip(blob, 100)) is None  # the header: the block map itself
    h = zf.parse_header_trailer(blob[:zf.HEADER_SIZE])
    assert _locate(tmp_path, _flip(blob, h.index_offset + 2)) is None  # the index (its CRC fails)
    plain = _zfile(verify=False)
    off, _ = _blocks(plain).block_range(3)
    assert _locate(tmp_path, _flip(plain, off)) is None  # no per-block CRC
    assert _locate(tmp_path, random.Random(2).randbytes(50_000)) is None  # not a ZFile
