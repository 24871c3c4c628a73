"""SCSI CDBs for the frontend tests (big-endian, as the wire has them)."""

from __future__ import annotations

import struct


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    """A 10-byte READ/WRITE-shaped CDB: opcode, flags, 32-bit LBA, 16-bit transfer length."""
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    """A 16-byte READ/WRITE-shaped CDB: opcode, flags, 64-bit LBA, 32-bit transfer length."""
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)
