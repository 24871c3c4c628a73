"""BlockImage: what the frontends (TCMU, NBD, export) see. Byte-addressed, any alignment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the virtual disk: `kind` is "data", "zero" (a zeroed mapping) or "hole"."""

    offset: int
    length: int
    kind: str


@runtime_checkable
class BlockImage(Protocol):
    size: int  # virtual disk size in bytes
    block_size: int  # logical block size (512, as upstream reports)
    read_only: bool

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill buf with the disk's bytes at offset; raises ImageIOError."""

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write to the writable upper; raises ReadOnlyError when there is none."""

    async def discard(self, offset: int, length: int) -> None:
        """Make the range read as zeros (upper-layer zeroed mapping / hole)."""

    async def flush(self) -> None:
        """Make every acknowledged write durable."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation map of [offset, offset+length) (holes and zeroed runs vs data)."""

    async def aclose(self) -> None: ...
