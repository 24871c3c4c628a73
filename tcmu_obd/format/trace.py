"""overlaybd's binary prefetch trace file (spec §7). Sans-IO.

A trace lists the reads an image saw while recording, so a later start can replay them to warm
the cache. Layout (x86-64 natural alignment, little-endian)::

    header, 24 bytes: u32 magic 0xC2EF1820 | 4 pad | u64 data_size | u32 checksum | 4 pad
    record, 24 bytes: char op | 3 pad | u32 layer_index | u64 count | i64 offset

`data_size` is 24 x records; the file must be exactly 24 + data_size bytes. `checksum` is the
raw CRC32C (crc.py) chained over the records as stored, padding included: upstream does not
zero the padding, so the checksum is computed over the bytes read, never over a re-encoding.
Offsets and counts are bytes in the decompressed byte space of layer `layer_index`
(0 = bottom lower). A replay file that does not start with the magic is the text
"priority list" form instead (not handled here): `is_trace` tells them apart.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ChecksumError, FormatError

TRACE_MAGIC = 0xC2EF1820  # zlib CRC-32 of "Container Image Trace Format"
HEADER_SIZE = 24
RECORD_SIZE = 24
OP_READ = "R"
OP_WRITE = "W"

_HEADER = struct.Struct("<I4xQI4x")
_RECORD = struct.Struct("<c3xIQq")
# A trace is held in memory by whoever replays it; refuse absurd sizes up front.
MAX_RECORDS = 1 << 26


@dataclass(frozen=True)
class TraceRecord:
    op: str  # "R" (the only op upstream records) or "W"
    layer_index: int
    count: int  # bytes
    offset: int  # bytes


def _checksum(body) -> int:
    # Imported on use: every process that schedules loads this module, and loading crc32c
    # (which reads its package metadata) is ~15 ms of `tcmu-obd fetch`'s start-up.
    from .crc import crc32c_raw

    return crc32c_raw(body)


def is_trace(data: bytes | bytearray | memoryview) -> bool:
    """True if `data` starts with the binary trace magic (else: a text priority list)."""
    return len(data) >= 4 and struct.unpack_from("<I", data)[0] == TRACE_MAGIC


def parse_trace(data: bytes | bytearray | memoryview, *, source: str | None = None) -> list[TraceRecord]:
    """Parse a whole trace file.

    Raises FormatError for a bad magic, a size that disagrees with data_size, or a bad checksum.
    """
    mv = memoryview(data)
    if len(mv) < HEADER_SIZE:
        raise FormatError(f"trace file of {len(mv)} bytes is shorter than its {HEADER_SIZE}-byte header",
                          source=source, offset=0)
    magic, data_size, checksum = _HEADER.unpack_from(mv)
    if magic != TRACE_MAGIC:
        raise FormatError(f"bad trace magic {magic:#010x} (want {TRACE_MAGIC:#010x})", source=source, offset=0)
    if data_size % RECORD_SIZE:
        raise FormatError(f"trace data_size {data_size} is not a multiple of {RECORD_SIZE}",
                          source=source, offset=8)
    if data_size // RECORD_SIZE > MAX_RECORDS:
        raise FormatError(f"trace claims {data_size // RECORD_SIZE} records (limit {MAX_RECORDS})",
                          source=source, offset=8)
    if len(mv) != HEADER_SIZE + data_size:
        raise FormatError(f"trace file is {len(mv)} bytes but its header says {HEADER_SIZE + data_size}",
                          source=source, offset=8)
    body = mv[HEADER_SIZE:]
    actual = _checksum(body)
    if actual != checksum:
        raise ChecksumError(f"trace checksum mismatch (stored {checksum:#010x}, computed {actual:#010x})",
                            source=source, offset=16)
    return [
        TraceRecord(op.decode("latin-1"), layer, count, offset)
        for op, layer, count, offset in _RECORD.iter_unpack(body)
    ]


def build_record(r: TraceRecord) -> bytes:
    op = r.op.encode("latin-1")
    if len(op) != 1:
        raise ValueError(f"trace op must be one character, got {r.op!r}")
    return _RECORD.pack(op, r.layer_index, r.count, r.offset)


def build_trace(records: list[TraceRecord] | tuple[TraceRecord, ...]) -> bytes:
    """Serialise records (padding zeroed) with a valid header."""
    body = b"".join(build_record(r) for r in records)
    return _HEADER.pack(TRACE_MAGIC, len(body), _checksum(body)) + body
