"""CRC32C as overlaybd computes it: the raw register form, no pre- or post-inversion.

overlaybd's crc32c(buf) is the bare Castagnoli register update starting from 0 (the SSE4.2
`crc32` instruction, ARMv8 crc32c and its software tables all compute it), and
crc32c_extend(buf, seed) continues from `seed`. The `crc32c` package computes the standard
CRC-32C, which inverts the register before and after; undoing both inversions gives
raw(seed, data) = ~std(data, init=~seed).

Used for: ZFile header/trailer digest and index CRC (seed 0), the per-block CRC
(seed BLOCK_CRC_SEED), and the trace file checksum (seed 0, chained over records).
"""

from __future__ import annotations

import crc32c as _crc32c

_MASK = 0xFFFFFFFF

# NOI_WELL_KNOWN_PRIME: the seed of every ZFile per-block CRC (spec §2.5).
BLOCK_CRC_SEED = 100007


def crc32c_raw(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Raw CRC32C of `data` continuing from `seed` (chain calls by passing the last result)."""
    return (~_crc32c.crc32c(data, value=(~seed) & _MASK)) & _MASK
