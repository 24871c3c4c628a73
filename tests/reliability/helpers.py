"""Shared pieces of the reliability tests: blobs and the durable presence map (configs and the
`fetch` command line: tests/support/fetchcli.py)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from tcmu_obd.cache import PresenceMap
from tcmu_obd.format import zfile as zf


def zfile_raw(raw_mib: int, seed: int) -> bytes:
    """`raw_mib` MiB that compress to ~3/4: each 4 KiB is 3 KiB of noise and 1 KiB of zeros."""
    r = random.Random(seed)
    return b"".join(r.randbytes(3072) + bytes(1024) for _ in range(raw_mib * 256))


def zfile_blob(raw_mib: int, seed: int) -> bytes:
    """A ZFile (lz4, 4 KiB blocks, per-block CRC) of zfile_raw(raw_mib, seed)."""
    return zf.compress_bytes(zfile_raw(raw_mib, seed), "lz4", 4096, verify=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def durable_bytes(map_path: Path, size: int) -> int:
    """Bytes the durable presence map says are on disk (0 before it exists)."""
    m = PresenceMap.load(str(map_path), size)
    return m.present_bytes if m is not None else 0
