"""Binary prefetch trace file (sans-IO)."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import ChecksumError, FormatError
from tcmu_obd.format import trace
from tcmu_obd.format.crc import crc32c_raw
from tcmu_obd.format.trace import TraceRecord

RECORDS = [
    TraceRecord("R", 0, 4096, 0),
    TraceRecord("R", 2, 1 << 20, 536870912),
    TraceRecord("W", 1, 512, -1),
]


def test_magic_is_crc32_of_name():
    assert trace.TRACE_MAGIC == zlib.crc32(b"Container Image Trace Format") == 3270449184


def test_layout_by_hand():
    data = trace.build_trace(RECORDS[:2])
    assert len(data) == 24 + 48
    assert data[:4] == bytes.fromhex("2018efc2")
    magic, size, csum = struct.unpack_from("<I4xQI4x", data)
    assert (magic, size) == (trace.TRACE_MAGIC, 48)
    # checksum: raw CRC32C chained record by record from 0
    chained = 0
    for i in range(2):
        chained = crc32c_raw(data[24 + 24 * i:48 + 24 * i], chained)
    assert csum == chained
    assert data[24:48] == b"R\0\0\0" + struct.pack("<IQq", 0, 4096, 0)


def test_roundtrip_and_is_trace():
    data = trace.build_trace(RECORDS)
    assert trace.is_trace(data)
    assert trace.parse_trace(data) == RECORDS
    assert trace.parse_trace(memoryview(data)) == RECORDS
    assert trace.parse_trace(trace.build_trace([])) == []
    assert not trace.is_trace(b"/usr/bin/bash\n/etc/\n")
    assert not trace.is_trace(b"\x20\x18")


def test_padding_garbage_counts_in_checksum():
    # upstream does not zero record padding; the checksum covers the bytes as written
    body = bytearray(trace.build_trace(RECORDS)[24:])
    body[1:4] = b"\xaa\xbb\xcc"
    data = struct.pack("<I4xQI4x", trace.TRACE_MAGIC, len(body), crc32c_raw(body)) + body
    assert trace.parse_trace(data) == RECORDS


def test_bad_magic():
    data = bytearray(trace.build_trace(RECORDS))
    data[0] ^= 1
    with pytest.raises(FormatError, match="magic") as ei:
        trace.parse_trace(bytes(data), source="t.trace")
    assert ei.value.source == "t.trace" and ei.value.offset == 0


def test_wrong_size():
    data = trace.build_trace(RECORDS)
    with pytest.raises(FormatError, match="header says"):
        trace.parse_trace(data + b"\0")  # trailing data
    with pytest.raises(FormatError, match="header says"):
        trace.parse_trace(data[:-24])
    bad = bytearray(data)
    bad[8:16] = struct.pack("<Q", 50)
    with pytest.raises(FormatError, match="multiple of 24"):
        trace.parse_trace(bytes(bad))
    bad[8:16] = struct.pack("<Q", 24 * (1 << 40))
    with pytest.raises(FormatError, match="limit"):
        trace.parse_trace(bytes(bad))


def test_truncated_bytewise():
    data = trace.build_trace(RECORDS)
    for n in range(len(data)):
        with pytest.raises(FormatError):
            trace.parse_trace(data[:n])


def test_bad_checksum():
    data = bytearray(trace.build_trace(RECORDS))
    data[40] ^= 0x80
    with pytest.raises(ChecksumError, match="checksum") as ei:
        trace.parse_trace(bytes(data))
    assert ei.value.offset == 16


def test_build_rejects_bad_op():
    with pytest.raises(ValueError):
        trace.build_trace([TraceRecord("RW", 0, 1, 0)])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.builds(TraceRecord, st.sampled_from(["R", "W"]), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1)), max_size=40))
def test_roundtrip_any(records):
    assert trace.parse_trace(trace.build_trace(records)) == records


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_parse_raises_format_error_only(junk):
    try:
        trace.parse_trace(junk)
    except FormatError:
        pass
