"""Locate the damage in a blob whose sha256 did not match, so only the bad ranges are refetched.

A whole-blob digest says *that* a byte is wrong, not *where*. Most overlaybd layers are ZFiles
(possibly tar-wrapped) whose blocks carry a CRC32C each, so the blocks whose CRC fails are
where the wrong bytes are; refetching those instead of the whole blob turns one flipped byte
in a 10 GiB layer into a 64 KiB refetch. The digest stays the judge: if the blob still does
not match after the located ranges were refetched, the cache discards everything
(BlobCache._finish).

`locate_damage` returns None when it cannot name the damage: not a ZFile, no per-block CRC,
damaged header/trailer/index (those carry the block map itself), or every CRC fine (the wrong
byte is somewhere no CRC covers). Sync and blocking (reads the whole file): run it in a thread.
"""

from __future__ import annotations

import os

from ..errors import FormatError

PAGE = 4096
BATCH = 4 << 20  # stored bytes checked per read


def _pread(fd: int, offset: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = os.pread(fd, n - len(out), offset + len(out))
        if not got:
            raise FormatError(f"short read at {offset + len(out)}", offset=offset + len(out))
        out += got
    return bytes(out)


def locate_damage(path: str, size: int) -> list[tuple[int, int]] | None:
    """Page-aligned [start, end) blob ranges holding every ZFile block of `path` whose CRC fails,
    or None when the damage cannot be located (see module docstring)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _locate(fd, path, size)
    except (FormatError, OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _locate(fd: int, name: str, size: int) -> list[tuple[int, int]] | None:
    # Imported here, not at the top: only a digest mismatch needs the codecs, and loading them
    # (crc32c reads its package metadata) is ~45 ms of every `fetch` start-up otherwise.
    from ..format import tar as tarfmt
    from ..format import zfile as zf

    head = _pread(fd, 0, min(size, tarfmt.DETECT_BYTES))
    base, zsize = 0, size
    payload = tarfmt.detect(head, blob_size=size, source=name)
    if payload is not None:
        base, zsize = payload.offset, payload.size
    first = _pread(fd, base, min(zsize, zf.HEADER_SIZE))
    if not zf.is_zfile(first) or zsize < zf.HEADER_SIZE:
        return None
    header = zf.parse_header_trailer(first, source=name)
    zf.check_header(header, source=name)
    if not header.verify:
        return None
    trailer = None
    if zf.needs_trailer(header):
        trailer = zf.parse_header_trailer(_pread(fd, base + zsize - zf.HEADER_SIZE, zf.HEADER_SIZE), source=name)
    start, n = zf.index_location(header, trailer, zsize, source=name)
    jt = zf.JumpTable.from_index(_pread(fd, base + start, 4 * n), header, zf.index_info(header, trailer),
                                 source=name, index_offset=start)
    bad: list[tuple[int, int]] = []
    for batch in jt.plan_reads(range(jt.n_blocks), BATCH):
        stored = memoryview(_pread(fd, base + batch.offset, batch.length))
        for i in batch.blocks:
            off, ln = jt.block_range(i)
            rel = off - batch.offset
            try:
                zf.decode_block(stored[rel:rel + ln], algo=header.algo, verify=header.verify,
                                block_size=header.block_size, expected_len=jt.raw_len(i), source=name,
                                offset=off, index=i)
            except FormatError:
                a = (base + off) // PAGE * PAGE
                b = min(size, -(-(base + off + ln) // PAGE) * PAGE)
                if bad and a <= bad[-1][1]:
                    bad[-1] = (bad[-1][0], max(bad[-1][1], b))
                else:
                    bad.append((a, b))
    return bad or None
