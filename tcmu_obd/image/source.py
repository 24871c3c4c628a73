"""BlobSource: the one seam between the format code and where layer bytes live.

A BlobSource is a read-only byte range addressed from 0 to `size`. The format core never
does I/O itself; image/ asks a BlobSource for exactly the bytes a parser needs. Local
files, slices of another source (a tar payload), in-memory bytes and, later, a registry
blob behind the cache all implement the same three members.
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol, runtime_checkable

from ..errors import FormatError, ImageIOError


@runtime_checkable
class BlobSource(Protocol):
    name: str  # shown in error messages: a path, a digest, "tar(...)"
    size: int  # bytes

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill all of `buf` with the bytes at `offset`; raise if the range is not all there."""

    async def aclose(self) -> None: ...

    # Optional, not part of the protocol check: `read_into_nowait(offset, buf) -> bool` fills
    # buf synchronously and returns True when the bytes are at hand (memory, a local file, a
    # decoded-block cache), or returns False, having waited for nothing, when only the async
    # read_into can get them. Image.read_into_nowait uses it to answer cached reads without
    # a coroutine; sources without it (remote blobs, trace recording) always take the async path.


def nowait_reader(obj: object):
    """obj.read_into_nowait, bound, or None when obj has none or when its class overrides
    read_into below the class that defines read_into_nowait: such a subclass (counting, fault
    injection, gating a read) would be bypassed by the inherited fast path, so it gets none."""
    nowait = getattr(obj, "read_into_nowait", None)
    if nowait is None or "read_into" in getattr(obj, "__dict__", ()):
        return None
    for klass in type(obj).__mro__:
        if "read_into_nowait" in vars(klass):
            return nowait
        if "read_into" in vars(klass):
            return None
    return nowait


def check_range(src, offset: int, length: int) -> None:
    """Raise ImageIOError naming `src` unless [offset, offset + length) lies inside it."""
    if offset < 0 or offset + length > src.size:
        raise ImageIOError(f"{src.name}: read [{offset}, {offset + length}) past end {src.size}")


async def read_exact(src: BlobSource, offset: int, length: int) -> bytes:
    """Read `length` bytes at `offset`, checking the range against the source size first.

    Raises FormatError (not a giant allocation, not a short read) when the range lies past
    the end: a header that claims more than the blob holds is bad input.
    """
    if offset < 0 or length < 0 or offset + length > src.size:
        raise FormatError(
            f"read of {length} bytes at {offset} past end of blob (size {src.size})",
            source=src.name,
            offset=offset,
        )
    buf = bytearray(length)
    await src.read_into(offset, memoryview(buf))
    return bytes(buf)


class BytesSource:
    """An in-memory blob (tests, small generated layers)."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self._data = memoryview(bytes(data))
        self.name = name
        self.size = len(data)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self.read_into_nowait(offset, buf)

    def read_into_nowait(self, offset: int, buf: memoryview) -> bool:
        check_range(self, offset, len(buf))
        buf[:] = self._data[offset:offset + len(buf)]
        return True

    async def aclose(self) -> None:
        pass


class FileSource:
    """A local file read with pread. Local page-cache reads are fast enough to stay on the loop;
    reads larger than `offload_bytes` go to the default executor so a cold disk never stalls it."""

    offload_bytes = 1 << 20

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = os.fspath(path)
        self.name = name or self.path
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageIOError(f"cannot open {self.path}: {e.strerror}", e.errno) from e
        self.size = os.fstat(self._fd).st_size

    def _pread_into(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                raise ImageIOError(
                    f"{self.name}: short read at {offset + done} (file is {self.size} bytes)"
                )
            done += n

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if not self.read_into_nowait(offset, buf):
            await asyncio.get_running_loop().run_in_executor(None, self._pread_into, offset, buf)

    def read_into_nowait(self, offset: int, buf: memoryview) -> bool:
        n = len(buf)
        check_range(self, offset, n)
        if n > self.offload_bytes:
            return False  # big reads go to the executor (read_into)
        # one preadv straight into the caller's buffer; the loop only for a short read
        if os.preadv(self._fd, (buf,), offset) != n:
            self._pread_into(offset, buf)
        return True

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SliceSource:
    """A window [start, start+size) of another source, e.g. the payload of a tar wrapper."""

    def __init__(self, inner: BlobSource, start: int, size: int, name: str | None = None):
        if start < 0 or size < 0 or start + size > inner.size:
            raise FormatError(
                f"payload [{start}, {start + size}) does not fit in blob of {inner.size} bytes",
                source=inner.name,
                offset=start,
            )
        self.inner = inner
        self.start = start
        self.size = size
        self.name = name or inner.name
        self._inner_nowait = nowait_reader(inner)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        check_range(self, offset, len(buf))
        await self.inner.read_into(self.start + offset, buf)

    def read_into_nowait(self, offset: int, buf: memoryview) -> bool:
        check_range(self, offset, len(buf))
        nowait = self._inner_nowait
        return nowait is not None and nowait(self.start + offset, buf)

    async def invalidate(self, offset: int, length: int) -> None:
        """Forward to the inner source when it caches (see RemoteBlobSource.invalidate)."""
        inv = getattr(self.inner, "invalidate", None)
        if inv is not None:
            await inv(self.start + offset, length)

    async def aclose(self) -> None:
        await self.inner.aclose()
