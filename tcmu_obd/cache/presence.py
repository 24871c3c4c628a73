"""PresenceMap: which 4 KiB pages of a blob's cache file hold valid bytes.

Theory of operation
-------------------
A blob's cache file is sparse and has the blob's own offsets. Page i covers bytes
[i*page, min((i+1)*page, size)); the last page may be short. A page is *present* once all of
its bytes were written. The map is a bitmap, bit i = page i, least significant bit first.

Two copies exist:

* the in-memory map (this object) says what may be read now: it includes pages whose bytes
  were written but are not yet durable (they are in the page cache, readable);
* the side file `<data>.map` holds the last *durable* state. BlobCache only sets a bit there
  after the data under it was fdatasync'ed, and clears bits there (fsync'ed) before it
  overwrites a range, so after any crash every bit on disk is backed by good bytes.

Side file layout (little-endian): 32-byte header then the bitmap.

| off | size | field |
|---|---|---|
| 0 | 8 | magic `OBDPMAP1` |
| 8 | 4 | page size |
| 12 | 4 | flags: bit0 = verified (whole-blob sha256 checked) |
| 16 | 8 | blob size |
| 24 | 8 | reserved (0) |
| 32 | ceil(pages/8) | bitmap |

A torn write of the bitmap can only mix old and new bytes; since bits are only set for
durable data and cleared durably before reuse, any mix is still safe.
"""

from __future__ import annotations

import os
import re
import struct

MAGIC = b"OBDPMAP1"
HEADER = struct.Struct("<8sIIQQ")
HEADER_SIZE = 32
FLAG_VERIFIED = 1
PAGE_SIZE = 4096

_NOT_FULL = re.compile(rb"[^\xff]+")
_NOT_EMPTY = re.compile(rb"[^\x00]+")


class PresenceMap:
    """A bitmap of pages with range queries. Pure: no I/O except `load`/`to_bytes`."""

    def __init__(self, size: int, page_size: int = PAGE_SIZE):
        if size < 0 or page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"bad presence map geometry size={size} page={page_size}")
        self.size = size
        self.page_size = page_size
        self.pages = (size + page_size - 1) // page_size
        self.bits = bytearray((self.pages + 7) // 8)
        self.verified = False

    # --- page/byte helpers ---------------------------------------------------------------
    def _page_range(self, start: int, end: int, *, inner: bool) -> tuple[int, int]:
        """Pages covering bytes [start, end). inner=True: only pages wholly inside (the short
        last page counts as wholly inside when `end` reaches the blob end)."""
        ps = self.page_size
        end = min(end, self.size)
        if start >= end:
            return 0, 0
        if inner:
            p0 = (start + ps - 1) // ps
            p1 = self.pages if end >= self.size else end // ps
        else:
            p0 = start // ps
            p1 = (end + ps - 1) // ps
        return p0, max(p0, p1)

    def _set_pages(self, p0: int, p1: int, value: bool) -> int:
        """Set/clear bits [p0, p1); return how many bits changed."""
        if p0 >= p1:
            return 0
        before = self.count_pages(p0, p1)
        b = self.bits
        b0, b1 = p0 // 8, p1 // 8
        if b0 == b1:
            mask = ((1 << (p1 - p0)) - 1) << (p0 % 8)
            b[b0] = (b[b0] | mask) if value else (b[b0] & ~mask & 0xFF)
        else:
            if p0 % 8:
                mask = (0xFF << (p0 % 8)) & 0xFF
                b[b0] = (b[b0] | mask) if value else (b[b0] & ~mask & 0xFF)
                b0 += 1
            full = b"\xff" if value else b"\x00"
            b[b0:b1] = full * (b1 - b0)
            if p1 % 8:
                mask = (1 << (p1 % 8)) - 1
                b[b1] = (b[b1] | mask) if value else (b[b1] & ~mask & 0xFF)
        after = self.count_pages(p0, p1)
        return abs(after - before)

    def count_pages(self, p0: int = 0, p1: int | None = None) -> int:
        if p1 is None:
            p1 = self.pages
        if p0 >= p1:
            return 0
        b = self.bits
        b0, b1 = p0 // 8, p1 // 8
        if b0 == b1:
            return bin((b[b0] >> (p0 % 8)) & ((1 << (p1 - p0)) - 1)).count("1")
        n = 0
        if p0 % 8:
            n += bin(b[b0] >> (p0 % 8)).count("1")
            b0 += 1
        mid = b[b0:b1]
        n += int.from_bytes(mid, "little").bit_count()
        if p1 % 8:
            n += bin(b[b1] & ((1 << (p1 % 8)) - 1)).count("1")
        return n

    def test(self, page: int) -> bool:
        return bool(self.bits[page // 8] >> (page % 8) & 1)

    # --- byte-range API ----------------------------------------------------------------
    def mark(self, start: int, end: int) -> int:
        """Mark pages wholly inside [start, end) present; return bytes newly marked (approx. pages×page)."""
        p0, p1 = self._page_range(start, end, inner=True)
        return self._set_pages(p0, p1, True) * self.page_size

    def clear(self, start: int, end: int) -> int:
        """Clear every page touching [start, end); return bytes cleared (pages×page)."""
        p0, p1 = self._page_range(start, end, inner=False)
        return self._set_pages(p0, p1, False) * self.page_size

    def clear_all(self) -> None:
        self.bits[:] = bytes(len(self.bits))
        self.verified = False

    def is_present(self, start: int, end: int) -> bool:
        p0, p1 = self._page_range(start, end, inner=False)
        return self.count_pages(p0, p1) == p1 - p0

    @property
    def complete(self) -> bool:
        return self.count_pages() == self.pages

    @property
    def present_bytes(self) -> int:
        n = self.count_pages()
        if n and self.pages and self.test(self.pages - 1):
            return (n - 1) * self.page_size + (self.size - (self.pages - 1) * self.page_size)
        return n * self.page_size

    def missing_runs(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Byte ranges (page-aligned, clipped to size) not present within [start, end)."""
        if end is None:
            end = self.size
        p0, p1 = self._page_range(start, end, inner=False)
        out: list[tuple[int, int]] = []
        if p0 >= p1:
            return out
        bits = self.bits
        nbytes = (p1 + 7) // 8
        cur: int | None = None
        page = p0
        while page < p1:
            if page % 8 == 0:
                byte = bits[page // 8]
                if byte == 0xFF:
                    if cur is not None:
                        out.append((cur, page))
                        cur = None
                    m = _NOT_FULL.search(bits, page // 8, nbytes)
                    if m is None:
                        page = p1
                        break
                    page = max(page + 8, m.start() * 8)
                    continue
                if byte == 0 and page + 8 <= p1:
                    if cur is None:
                        cur = page
                    m = _NOT_EMPTY.search(bits, page // 8, nbytes)
                    page = min(p1, m.start() * 8) if m is not None else p1
                    continue
            if bits[page // 8] >> (page % 8) & 1:
                if cur is not None:
                    out.append((cur, page))
                    cur = None
            elif cur is None:
                cur = page
            page += 1
        if cur is not None:
            out.append((cur, p1))
        merged: list[tuple[int, int]] = []
        for a, b in out:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        ps = self.page_size
        return [(a * ps, min(b * ps, self.size)) for a, b in merged]

    def first_missing(self, start: int = 0) -> int | None:
        """Byte offset of the first missing page at or after `start` (page-aligned down), or None."""
        if start >= self.size:
            return None
        p = start // self.page_size
        b0 = p // 8
        # partial first byte
        for page in range(p, min((b0 + 1) * 8, self.pages)):
            if not self.test(page):
                return page * self.page_size
        m = _NOT_FULL.search(self.bits, b0 + 1)
        if m is None:
            return None
        for page in range(m.start() * 8, min(m.end() * 8, self.pages)):
            if not self.test(page):
                return page * self.page_size
        return None

    # --- persistence -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        hdr = HEADER.pack(MAGIC, self.page_size, FLAG_VERIFIED if self.verified else 0, self.size, 0)
        return hdr + bytes(self.bits)

    @classmethod
    def from_bytes(cls, data: bytes, size: int, page_size: int = PAGE_SIZE) -> "PresenceMap | None":
        """Parse a side file; None when it is not a map for a blob of this size and page."""
        if len(data) < HEADER_SIZE:
            return None
        magic, page, flags, blob_size, _ = HEADER.unpack_from(data)
        if magic != MAGIC or page != page_size or blob_size != size:
            return None
        m = cls(size, page_size)
        body = data[HEADER_SIZE : HEADER_SIZE + len(m.bits)]
        if len(body) != len(m.bits):
            return None
        m.bits[:] = body
        if m.pages % 8:  # bits past the last page must be zero
            m.bits[-1] &= (1 << (m.pages % 8)) - 1
        m.verified = bool(flags & FLAG_VERIFIED)
        return m

    @classmethod
    def load(cls, path: str, size: int, page_size: int = PAGE_SIZE) -> "PresenceMap | None":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return cls.from_bytes(data, size, page_size)


def write_map_file(fd: int, data: bytes) -> None:
    """pwrite the whole map at 0 and fsync (blocking; call from an executor)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], done)
    os.fsync(fd)
