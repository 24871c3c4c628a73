"""Tar wrapper and prefetch trace: damaged input is FormatError (tar: or "not a tar", None),
never a crash, a negative size or a payload past the blob."""

from __future__ import annotations

import functools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_obd.errors import FormatError
from tcmu_obd.format import tar, trace
from tcmu_obd.format.crc import crc32c_raw
from tests.support.paths import FIXTURES_OBD

from .mutate import Seed, be, fuzz_settings, mutants, only, u32le, u64le


def _retar_checksum(block: bytearray, base: int) -> None:
    """Recompute a ustar header checksum (so damage elsewhere in the header is looked at)."""
    h = block[base:base + 512]
    if len(h) < 512:
        return
    h[148:156] = b" " * 8
    block[base + 148:base + 156] = f"{sum(h):6o}\0 ".encode()


@functools.lru_cache(maxsize=None)
def _tar_seeds() -> tuple[bytes, ...]:
    return (
        (FIXTURES_OBD / "ext4-chain" / "layers" / "L2.lz4.tar").read_bytes()[:tar.DETECT_BYTES],
        (FIXTURES_OBD / "zfile" / "compressed" / "plain.lz4.tar").read_bytes()[:tar.DETECT_BYTES],
        tar.build_wrapper_header(123456),
    )


# octal size fields of the PAX header and the file header; the PAX records block
_TAR_FIELDS = [(124, 12, ">"), (1024 + 124, 12, ">"), be(512, 4), be(516, 8)]
_TAR_HOT = [(124, 136), (156, 157), (512, 560), (1024 + 124, 1024 + 136), (257, 265)]


@fuzz_settings(200)
@given(mutants([Seed(s, _TAR_FIELDS, _TAR_HOT) for s in _tar_seeds()]), st.booleans(),
       st.sampled_from([None, 0, 1535, 1536, 1 << 20, 1 << 40]))
def test_damaged_tar_wrapper(case, rechecksum, blob_size):
    _, head = case
    if rechecksum:
        b = bytearray(head)
        _retar_checksum(b, 0)
        _retar_checksum(b, 1024)
        head = bytes(b)
    payload, _ = only((FormatError,), tar.detect, head, blob_size=blob_size, source="fuzz")
    if payload is not None:
        assert payload.size >= 0 and payload.offset in (tar.BLOCK, tar.PAX_PAYLOAD_OFFSET)
        if blob_size is not None:
            assert payload.offset + payload.size <= blob_size


@pytest.mark.parametrize("pax", [False, True], ids=["ustar", "pax-header"])
@pytest.mark.parametrize("text", [b"-1", b"-777", b"0o17", b"1_0", b" -5 ", b"+7", b"8"])
def test_tar_size_field_is_plain_octal(text, pax):
    """Regression: int() accepts signs, 0o prefixes and underscores, and "-1" gave a payload
    of size -1; a tar size field is octal digits only."""
    b = bytearray(tar.build_wrapper_header(100))
    if pax:  # the file header carries the size when the PAX records have no size=
        b[512:1024] = b"10 path=a\n".ljust(512, b"\0")
        b[124:136] = b"00000000012\0"
        base = 1024
    else:
        b[156] = ord("0")
        base = 0
    b[base + 124:base + 136] = text.ljust(11, b" ") + b"\0"
    _retar_checksum(b, 0)
    _retar_checksum(b, 1024)
    with pytest.raises(FormatError, match="size"):
        tar.detect(bytes(b))


@pytest.mark.parametrize("value", ["-5", "+5", "1_0", " 5", "\u0665", "5x"])
def test_pax_size_record_is_decimal_digits(value):
    """Regression: the PAX size= record was parsed with int(), which takes "+5", "1_0",
    " 5" and Arabic-Indic digits."""
    b = bytearray(tar.build_wrapper_header(100))
    body = f" size={value}\n".encode()
    n = len(body) + 2
    b[512:1024] = (str(n).encode() + body).ljust(512, b"\0")
    b[124:136] = f"{n:011o}\0".encode()
    _retar_checksum(b, 0)
    with pytest.raises(FormatError, match="PAX size"):
        tar.detect(bytes(b))


# --- trace ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _trace_seed() -> bytes:
    recs = [trace.TraceRecord("R", i % 3, 4096 * (i + 1), 512 * i) for i in range(8)]
    return trace.build_trace(recs)


_TRACE_FIELDS = [u32le(0), u64le(8), u32le(16)] + [u64le(24 + 24 * i + 8) for i in range(4)] + \
    [u64le(24 + 24 * i + 16) for i in range(4)]


@fuzz_settings(150)
@given(mutants([Seed(_trace_seed(), _TRACE_FIELDS, [(0, 24), (24, 24 * 9)])]), st.booleans())
def test_damaged_trace(case, refix):
    _, data = case
    if refix and len(data) >= 24:  # a valid checksum over the damaged records
        data = data[:16] + struct.pack("<I", crc32c_raw(data[24:])) + data[20:]
    records, _ = only((FormatError,), trace.parse_trace, data, source="fuzz")
    if records is not None:
        assert len(records) * trace.RECORD_SIZE + trace.HEADER_SIZE == len(data)
