"""A BlockImage kept in memory: a test double for frontend tests, and a model to compare against."""

from __future__ import annotations

from ..errors import ImageIOError, ReadOnlyError
from .base import Extent


class MemoryImage:
    def __init__(self, size: int, data: bytes | None = None, read_only: bool = False, block_size: int = 512):
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        self._buf = bytearray(size)
        if data:
            self._buf[: len(data)] = data
        self.flushes = 0

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageIOError(f"range [{offset}, {offset + length}) outside disk of {self.size} bytes", 22)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        buf[:] = self._buf[offset : offset + len(buf)]

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError()
        self._check(offset, len(data))
        self._buf[offset : offset + len(data)] = data

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError()
        self._check(offset, length)
        self._buf[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        self.flushes += 1

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, "data")]

    async def aclose(self) -> None:
        pass
