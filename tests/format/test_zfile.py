"""ZFile codec (sans-IO): CRC convention, header/trailer, index checks, block decode, writer."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import ChecksumError, FormatError
from tcmu_obd.format import zfile as zf
from tcmu_obd.format.crc import BLOCK_CRC_SEED, crc32c_raw
from tests.support.paths import FIXTURES_OBD

ZDIR = FIXTURES_OBD / "zfile"
EXPECTED = json.loads((FIXTURES_OBD / "expected.json").read_text())
ZFILE_CASES = sorted(k for k in EXPECTED["zfile"] if k.endswith(".zfile"))
CHAIN_CASES = sorted(k for k in EXPECTED["ext4-chain"]["zfile_decoded_sha256"] if k.endswith(".zfile"))


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read(path) -> bytes:
    return path.read_bytes()


# -- CRC -------------------------------------------------------------------------------------


def test_crc_raw_known_values_and_chaining():
    # Standard CRC-32C check value of "123456789" is 0xE3069283; the raw form is its inverse
    # with inverted seed, i.e. raw(~0, data) == ~std(data).
    assert crc32c_raw(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283
    assert crc32c_raw(b"") == 0
    assert crc32c_raw(b"", 1234) == 1234
    assert crc32c_raw(b"world", crc32c_raw(b"hello ")) == crc32c_raw(b"hello world")
    assert BLOCK_CRC_SEED == 100007


def test_crc_matches_fixture_block_and_digest():
    blob = read(ZDIR / "compressed/tiny.lz4.zfile")
    hdr = bytearray(blob[:512])
    (digest,) = struct.unpack_from("<I", hdr, 28)
    hdr[28:32] = bytes(4)
    assert crc32c_raw(hdr) == digest
    block = blob[512:564]  # tiny.bin: one block of 48 compressed bytes + CRC (index says 52)
    assert struct.unpack("<I", blob[564:568])[0] == 52
    assert crc32c_raw(block[:-4], BLOCK_CRC_SEED) == struct.unpack("<I", block[-4:])[0]


# -- header / trailer ------------------------------------------------------------------------


def test_is_zfile():
    blob = read(ZDIR / "compressed/tiny.lz4.zfile")
    assert zf.is_zfile(blob)
    assert zf.is_zfile(blob[:24])
    assert not zf.is_zfile(blob[:23])
    assert not zf.is_zfile(b"")
    assert not zf.is_zfile(b"LSMT\x00\x01\x02\x00" + bytes(600))


def test_parse_fixture_header_and_trailer():
    blob = read(ZDIR / "compressed/plain.lz4.zfile")
    h = zf.parse_header_trailer(blob[:512])
    t = zf.parse_header_trailer(blob[-512:], offset=len(blob) - 512)
    assert h.flags == 0x13 and h.is_header and h.is_data and h.has_digest and not h.header_overwrite
    assert not h.is_sealed and h.index_size == 0
    assert t.flags == 0x16 and not t.is_header and t.is_data and t.is_sealed and t.has_digest
    assert (t.index_offset, t.index_size, t.original_file_size) == (316183, 257, 1049810)
    assert (t.block_size, t.algo, t.level, t.verify, t.dict_size, t.size) == (4096, 1, 0, 1, 0, 96)
    assert zf.needs_trailer(h)
    assert zf.index_location(h, t, len(blob)) == (316183, 257)
    assert zf.index_info(h, t) is t


def test_parse_overwritten_header_needs_no_trailer():
    blob = read(FIXTURES_OBD / "ext4-chain/layers/L2.lz4.zfile")
    h = zf.parse_header_trailer(blob[:512])
    assert h.flags == 0x1B and h.header_overwrite
    assert not zf.needs_trailer(h)
    assert zf.index_location(h, None, len(blob)) == (411228, 419)


def test_build_header_roundtrips_fixture_bytes():
    for name in ("plain.lz4.zfile", "plain.zstd-bs16.zfile", "empty.zstd.zfile"):
        blob = read(ZDIR / "compressed" / name)
        for area in (blob[:512], blob[-512:]):
            assert zf.build_header_trailer(zf.parse_header_trailer(area)) == area


def test_parse_header_whole_bytewise_and_trailing():
    area = read(ZDIR / "compressed/plain.lz4.zfile")[:512]
    whole = zf.parse_header_trailer(area)
    assert zf.parse_header_trailer(area + b"trailing junk" * 10) == whole
    assert zf.parse_header_trailer(memoryview(area)) == whole
    for n in range(0, 512, 37):  # every short prefix is an error, never a partial parse
        with pytest.raises(FormatError, match="needs 512 bytes"):
            zf.parse_header_trailer(area[:n], source="x.zfile")


def test_header_digest_mismatch_names_source_and_offset():
    area = bytearray(read(ZDIR / "compressed/plain.lz4.zfile")[:512])
    area[72] ^= 0x01  # block_size
    with pytest.raises(ChecksumError) as ei:
        zf.parse_header_trailer(bytes(area), source="bad.zfile")
    assert ei.value.source == "bad.zfile" and ei.value.offset == 28
    assert "digest mismatch" in str(ei.value) and "bad.zfile" in str(ei.value)


def test_bad_magic_is_format_error():
    with pytest.raises(FormatError, match="bad magic") as ei:
        zf.parse_header_trailer(bytes(512), source="zero.bin", offset=0)
    assert ei.value.source == "zero.bin" and ei.value.offset == 0


def test_old_header_garbage_high_flag_bits_accepted():
    # 2021-era writers: flags low byte 0x43, no digest, garbage in reserved/unused bytes.
    h = zf.ZFileHeader(flags=0x43 | (0xDEAD << 16), digest=0x7FA0, reserved=0x7FFE)
    area = bytearray(zf.build_header_trailer(h))
    area[200:260] = bytes(range(60))  # junk after the struct
    area[89:96] = b"garbage"
    parsed = zf.parse_header_trailer(bytes(area))
    assert parsed.flags == 0x03 and parsed.is_header and parsed.is_data and not parsed.has_digest
    zf.check_header(parsed)


def resign(area: bytes, **changes) -> bytes:
    return zf.build_header_trailer(replace(zf.parse_header_trailer(area), **changes))


@pytest.mark.parametrize("algo", [0, 3, 255])
def test_unknown_algorithm(algo):
    area = resign(read(ZDIR / "compressed/plain.lz4.zfile")[:512], algo=algo)
    h = zf.parse_header_trailer(area)
    with pytest.raises(FormatError, match="unsupported zfile compression algorithm") as ei:
        zf.check_header(h, source="a.zfile")
    assert ei.value.source == "a.zfile" and ei.value.offset == 76


@pytest.mark.parametrize("bs", [0, 100, 4095, 1 << 21, 0xFFFFFFFF])
def test_implausible_block_size(bs):
    h = zf.parse_header_trailer(resign(read(ZDIR / "compressed/plain.lz4.zfile")[:512], block_size=bs))
    with pytest.raises(FormatError, match="block size"):
        zf.check_header(h)


def test_header_flagged_trailer_rejected():
    blob = read(ZDIR / "compressed/plain.lz4.zfile")
    with pytest.raises(FormatError, match="flagged as a trailer"):
        zf.check_header(zf.parse_header_trailer(blob[-512:]))


# -- index location ---------------------------------------------------------------------------


def _plain_ht():
    blob = read(ZDIR / "compressed/plain.lz4.zfile")
    return blob, zf.parse_header_trailer(blob[:512]), zf.parse_header_trailer(blob[-512:])


def test_index_location_requires_sealed_trailer():
    blob, h, t = _plain_ht()
    with pytest.raises(FormatError, match="needs its trailer"):
        zf.index_location(h, None, len(blob), source="p")
    for flags in (0x12, 0x17, 0x02 | 0x10):  # not sealed / header bit / not sealed
        with pytest.raises(FormatError, match="not sealed or truncated"):
            zf.index_location(h, replace(t, flags=flags), len(blob), source="p")


@pytest.mark.parametrize("n", [1_000_000_001, 2**63])
def test_index_size_absurd(n):
    blob, h, t = _plain_ht()
    with pytest.raises(FormatError, match="exceeds"):
        zf.index_location(h, replace(t, index_size=n), len(blob), source="p")


def test_index_past_eof_or_before_data():
    blob, h, t = _plain_ht()
    with pytest.raises(FormatError, match="does not fit"):
        zf.index_location(h, replace(t, index_size=t.index_size + 1), len(blob), source="p")
    with pytest.raises(FormatError, match="does not fit"):
        zf.index_location(h, t, len(blob) - 1, source="p")  # truncated: trailer moves
    with pytest.raises(FormatError, match="does not fit"):
        zf.index_location(h, replace(t, index_offset=100), len(blob))
    with pytest.raises(FormatError, match="does not fit"):
        zf.index_location(h, replace(t, index_offset=2**64 - 4), len(blob))
    ho = replace(h, flags=0x1B, index_offset=t.index_offset, index_size=10**8,
                 original_file_size=10**8 * 4096)
    with pytest.raises(FormatError, match="does not fit"):
        zf.index_location(ho, None, len(blob))


def test_index_count_must_match_original_size():
    blob, h, t = _plain_ht()
    with pytest.raises(FormatError, match="needs 258"):
        zf.index_location(h, replace(t, original_file_size=257 * 4096 + 1), len(blob))


def test_header_without_data_flag_rejected():
    blob, h, t = _plain_ht()
    with pytest.raises(FormatError, match="not flagged as a data file"):
        zf.index_location(replace(h, flags=0x11), t, len(blob))


# -- jump table -----------------------------------------------------------------------------


def _index(blob, t):
    return blob[t.index_offset:t.index_offset + 4 * t.index_size]


def test_jump_table_from_fixture():
    blob, h, t = _plain_ht()
    jt = zf.JumpTable.from_index(_index(blob, t), h, t, index_offset=t.index_offset)
    assert jt.n_blocks == 257
    assert jt.block_range(0)[0] == 512
    assert jt.data_end == t.index_offset
    assert jt.raw_len(0) == 4096 and jt.raw_len(256) == 1049810 - 256 * 4096
    assert jt.blocks_for(0, 1) == range(0, 1)
    assert jt.blocks_for(4095, 2) == range(0, 2)
    assert jt.blocks_for(4096, 4096) == range(1, 2)
    assert jt.blocks_for(1049809, 100) == range(256, 257)  # clamped to the original size
    assert jt.blocks_for(1049810, 10) == range(0)
    assert jt.blocks_for(5, 0) == range(0)
    with pytest.raises(IndexError):
        jt.block_range(257)


def test_plan_reads_coalesces():
    blob, h, t = _plain_ht()
    jt = zf.JumpTable.from_index(_index(blob, t), h, t)
    (one,) = jt.plan_reads(range(3, 40))
    assert one.blocks == range(3, 40)
    assert one.offset == jt.block_range(3)[0]
    assert one.offset + one.length == sum(jt.block_range(39))
    small = jt.plan_reads(range(0, 257), max_bytes=10000)
    assert [b.blocks.start for b in small][0] == 0 and small[-1].blocks.stop == 257
    for a, b in zip(small, small[1:]):
        assert a.blocks.stop == b.blocks.start and a.offset + a.length == b.offset
    assert all(b.length <= 10000 or len(b.blocks) == 1 for b in small)
    assert jt.plan_reads(range(0)) == []
    # a single block bigger than the cap still gets a batch
    (big,) = jt.plan_reads(range(5, 6), max_bytes=1)
    assert big.blocks == range(5, 6)


def test_index_crc_mismatch():
    blob, h, t = _plain_ht()
    idx = bytearray(_index(blob, t))
    idx[10] ^= 0x40
    with pytest.raises(ChecksumError, match="index CRC") as ei:
        zf.JumpTable.from_index(bytes(idx), h, t, source="p.zfile")
    assert ei.value.source == "p.zfile" and ei.value.offset == t.index_offset


def test_index_zero_entry_rejected():
    blob, h, t = _plain_ht()
    idx = bytearray(_index(blob, t))
    idx[8:12] = struct.pack("<I", 0)
    t2 = replace(t, index_crc=crc32c_raw(idx))
    with pytest.raises(FormatError, match="entry 2 is 0 bytes") as ei:
        zf.JumpTable.from_index(bytes(idx), h, t2, source="p")
    assert ei.value.offset == t.index_offset + 8
    idx[8:12] = struct.pack("<I", 4)  # with verify a block must hold more than its CRC
    with pytest.raises(FormatError, match="must be >= 5"):
        zf.JumpTable.from_index(bytes(idx), h, replace(t, index_crc=crc32c_raw(idx)))
    # without verify, 4 bytes is a legal (if odd) block length
    zf.JumpTable.from_index(bytes(idx), replace(h, verify=0), replace(t, flags=0x06, verify=0))


def test_index_blocks_overrun_index():
    blob, h, t = _plain_ht()
    idx = bytearray(_index(blob, t))
    idx[0:4] = struct.pack("<I", 10**6)
    with pytest.raises(FormatError, match="past the index"):
        zf.JumpTable.from_index(bytes(idx), h, replace(t, index_crc=crc32c_raw(idx)))


def test_index_not_multiple_of_4():
    _, h, t = _plain_ht()
    with pytest.raises(FormatError, match="multiple of 4"):
        zf.JumpTable.from_index(b"\x01\x02\x03", h, t)


# -- decode_block ---------------------------------------------------------------------------


def _block(blob, jt, i):
    off, ln = jt.block_range(i)
    return off, blob[off:off + ln]


def test_decode_block_ok_and_crc_error_names_block():
    blob, h, t = _plain_ht()
    plain = read(ZDIR / "plain/plain.bin")
    jt = zf.JumpTable.from_index(_index(blob, t), h, t)
    off, stored = _block(blob, jt, 7)
    kw = dict(algo=1, verify=True, block_size=4096, expected_len=4096)
    assert zf.decode_block(stored, **kw) == plain[7 * 4096:8 * 4096]
    bad = bytearray(stored)
    bad[3] ^= 1
    with pytest.raises(ChecksumError, match="block 7: CRC mismatch") as ei:
        zf.decode_block(bytes(bad), **kw, source="p.zfile", offset=off, index=7)
    assert ei.value.source == "p.zfile" and ei.value.offset == off
    with pytest.raises(FormatError, match="too short"):
        zf.decode_block(b"\x00\x01\x02\x03", **kw)


def test_decode_block_wrong_expected_length():
    blob, h, t = _plain_ht()
    jt = zf.JumpTable.from_index(_index(blob, t), h, t)
    _, stored = _block(blob, jt, 0)
    with pytest.raises(FormatError, match="block 0"):
        zf.decode_block(stored, algo=1, verify=True, block_size=4096, expected_len=4000, index=0)
    with pytest.raises(FormatError, match="outside"):
        zf.decode_block(stored, algo=1, verify=True, block_size=4096, expected_len=5000)


def test_decode_block_zstd_frame_lying_about_size():
    import zstandard

    frame = zstandard.ZstdCompressor(level=3).compress(b"\0" * 8192)
    with pytest.raises(FormatError, match="claims 8192"):
        zf.decode_block(frame, algo=2, verify=False, block_size=4096, expected_len=4096)
    # no content size in the frame: bounded by expected_len
    frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\0" * 8192)
    with pytest.raises(FormatError):
        zf.decode_block(frame, algo=2, verify=False, block_size=4096, expected_len=4096)
    frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"a" * 4096)
    assert zf.decode_block(frame, algo=2, verify=False, block_size=4096, expected_len=4096) == b"a" * 4096


def test_decode_block_garbage_is_format_error():
    for algo in (1, 2):
        for junk in (b"\xff" * 50, b"\x00", bytes(range(256))):
            with pytest.raises(FormatError):
                zf.decode_block(junk, algo=algo, verify=False, block_size=4096, expected_len=4096)
    with pytest.raises(FormatError, match="unsupported"):
        zf.decode_block(b"abc", algo=9, verify=False, block_size=4096, expected_len=3)


# -- whole-file decode of the upstream fixtures ------------------------------------------------


@pytest.mark.parametrize("name", ZFILE_CASES)
def test_fixture_zfiles_decode(name):
    case = EXPECTED["zfile"][name]
    out = zf.decompress_bytes(read(ZDIR / name), source=name)
    assert len(out) == case["plain_size"]
    assert sha(out) == case["plain_sha256"]


@pytest.mark.parametrize("name", CHAIN_CASES)
def test_chain_zfiles_decode_to_lsmt(name):
    out = zf.decompress_bytes(read(FIXTURES_OBD / "ext4-chain" / name), source=name)
    assert sha(out) == EXPECTED["ext4-chain"]["zfile_decoded_sha256"][name]


@pytest.mark.parametrize("name", sorted(EXPECTED["pattern"]["zfile_decoded_equals"]))
def test_pattern_zfiles_decode_to_lsmt(name):
    out = zf.decompress_bytes(read(FIXTURES_OBD / "pattern" / name), source=name)
    want = read(FIXTURES_OBD / "pattern" / EXPECTED["pattern"]["zfile_decoded_equals"][name])
    assert out == want


# -- writer: byte identity with upstream's overlaybd-zfile --------------------------------------

IDENTITY = [
    ("plain.lz4.zfile", "plain.bin", "lz4", 4096, True),
    ("plain.zstd.zfile", "plain.bin", "zstd", 4096, True),
    ("plain.lz4-bs32.zfile", "plain.bin", "lz4", 32768, True),
    ("plain.zstd-bs16.zfile", "plain.bin", "zstd", 16384, True),
    ("tiny.lz4.zfile", "tiny.bin", "lz4", 4096, True),
    ("empty.zstd.zfile", "empty.bin", "zstd", 4096, True),
    ("plain.lz4-nocrc.zfile", "plain.bin", "lz4", 4096, False),
]


@pytest.mark.parametrize("name,plain,algo,bs,verify", IDENTITY)
def test_writer_byte_identical_to_upstream(name, plain, algo, bs, verify):
    if algo == "lz4" and zf.lz4_compress_default is zf._python_lz4_compress:
        # python-lz4 picks other (valid) matches than the C library's LZ4_compress_default;
        # identity for lz4 holds with the system liblz4 only. Still check the decode.
        out = zf.compress_bytes(read(ZDIR / "plain" / plain), algo, bs, verify, overwrite_header=False)
        assert zf.decompress_bytes(out) == read(ZDIR / "plain" / plain)
        return
    out = zf.compress_bytes(read(ZDIR / "plain" / plain), algo, bs, verify, overwrite_header=False)
    assert sha(out) == sha(read(ZDIR / "compressed" / name))


def test_system_lz4_in_use_here():
    # This host has liblz4; byte identity above must really have been checked.
    assert zf.lz4_compress_default is not zf._python_lz4_compress


def test_writer_overwrite_header_like_commit():
    data = read(ZDIR / "plain/plain.bin")
    out = zf.compress_bytes(data, "lz4")
    upstream = read(ZDIR / "compressed/plain.lz4.zfile")
    h = zf.parse_header_trailer(out[:512])
    t = zf.parse_header_trailer(out[-512:])
    assert h.flags == 0x1B and t.flags == 0x16
    assert (h.index_offset, h.index_size, h.original_file_size, h.index_crc) == (
        t.index_offset, t.index_size, t.original_file_size, t.index_crc)
    # everything but the first 512 bytes is what overlaybd-zfile writes
    assert out[512:] == upstream[512:]


def test_writer_matches_commit_z_header_shape():
    # overlaybd-commit -z output (L2.lz4.zfile): re-encode its decoded LSMT and compare everything.
    blob = read(FIXTURES_OBD / "ext4-chain/layers/L2.lz4.zfile")
    lsmt = read(FIXTURES_OBD / "ext4-chain/layers/L2.lsmt")
    assert zf.compress_bytes(lsmt, "lz4") == blob
    blob = read(FIXTURES_OBD / "ext4-chain/layers/L2.zstd.zfile")
    assert zf.compress_bytes(lsmt, "zstd") == blob


def test_writer_incremental_api():
    w = zf.ZFileWriter("zstd", 8192, verify=True)
    assert zf.parse_header_trailer(w.header_placeholder()).flags == 0x13
    parts = [w.add_block(b"a" * 8192), w.add_block(b"b" * 100)]
    assert w.n_blocks == 2
    with pytest.raises(ValueError, match="only the last block"):
        w.add_block(b"c" * 8192)
    with pytest.raises(ValueError, match="original size"):
        w.finish(9000)
    tail, header = w.finish(8292)
    blob = header + b"".join(parts) + tail
    assert zf.decompress_bytes(blob) == b"a" * 8192 + b"b" * 100
    with pytest.raises(ValueError, match="finished"):
        w.finish(8292)


def test_writer_rejects_bad_parameters():
    with pytest.raises(ValueError):
        zf.ZFileWriter("lzo")
    with pytest.raises(ValueError):
        zf.ZFileWriter("lz4", 12345)
    w = zf.ZFileWriter("lz4")
    with pytest.raises(ValueError):
        w.add_block(b"")
    with pytest.raises(ValueError):
        w.add_block(b"x" * 4097)


RAND = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB of incompressible-ish bytes


def _sample(size: int) -> bytes:
    # random first half, zeros, text: exercises incompressible, RLE and ordinary blocks
    third = size // 3
    need = size - 2 * third
    text = b"".join(b"line of text %d\n" % i for i in range(need // 14 + 1))[:need]
    rnd = (RAND * (third // len(RAND) + 1))[:third]
    return rnd + bytes(third) + text


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
@pytest.mark.parametrize("bs", [4096, 8192, 16384, 32768, 65536])
@pytest.mark.parametrize("verify", [True, False])
def test_roundtrip_sizes(algo, bs, verify):
    for size in (0, 1, bs - 1, bs, bs + 1, 3 * bs + 17):
        data = _sample(size)
        assert len(data) == size
        blob = zf.compress_bytes(data, algo, bs, verify)
        assert zf.decompress_bytes(blob) == data, size
        h = zf.parse_header_trailer(blob[:512])
        assert h.verify == int(verify) and h.block_size == bs
        assert h.index_size == -(-size // bs)


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_bs64_blocks_stored_bigger_than_64k(algo):
    # Upstream cannot read these (its read buffer is 64 KiB); we must.
    data = read(ZDIR / "plain/rand64.bin")
    blob = zf.compress_bytes(data, algo, 65536, True)
    t = zf.parse_header_trailer(blob[-512:])
    idx = blob[t.index_offset:t.index_offset + 4 * t.index_size]
    first = struct.unpack_from("<I", idx)[0]
    assert first == {"lz4": 65798, "zstd": 65550}[algo]  # the sizes the fixture notes record
    assert zf.decompress_bytes(blob) == data


# -- fuzz: any corruption decodes or raises FormatError, nothing else ---------------------------

SMALL = zf.compress_bytes(_sample(20000), "lz4", 4096, True, overwrite_header=False)
SMALL_Z = zf.compress_bytes(_sample(20000), "zstd", 4096, True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from([SMALL, SMALL_Z]), pos=st.integers(0, len(SMALL_Z) - 1),
       val=st.integers(0, 255), cut=st.one_of(st.none(), st.integers(0, len(SMALL_Z))))
def test_fuzz_corruption_raises_format_error_only(which, pos, val, cut):
    blob = bytearray(which)
    blob[pos % len(blob)] = val
    if cut is not None:
        blob = blob[:cut]
    try:
        out = zf.decompress_bytes(bytes(blob), source="fuzz")
    except FormatError as e:
        assert e.source == "fuzz"
    else:
        assert len(out) == 20000


def test_block_count_bounded_by_data_area():
    # index fits in the blob, but the 1-byte data area before it cannot hold 100 blocks
    h = zf.ZFileHeader(flags=0x1B, index_offset=513, index_size=100, original_file_size=100 * 4096)
    with pytest.raises(FormatError, match="cannot hold"):
        zf.index_location(h, None, 10000, source="x")
    # without CRCs a block may be 1 byte: 100 blocks need 100 bytes of data
    h = replace(h, verify=0, index_offset=612)
    assert zf.index_location(h, None, 10000) == (612, 100)
