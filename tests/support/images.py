"""Helpers to hash whole virtual disks quickly: holes and zeroed runs are fed as shared zero chunks."""

from __future__ import annotations

import hashlib

CHUNK = 8 << 20
_ZEROS = bytes(CHUNK)


async def image_sha256(image, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    zeros = memoryview(_ZEROS)
    buf = bytearray(chunk)
    for ext in image.extents(0, image.size):
        off, end = ext.offset, ext.offset + ext.length
        while off < end:
            n = min(chunk, end - off)
            if ext.kind == "data":
                view = memoryview(buf)[:n]
                await image.read_into(off, view)
                h.update(view)
            else:
                h.update(zeros[:n])
            off += n
    return h.hexdigest()
