"""Opening one layer blob: the detection chain tar → ZFile → LSMT, as upstream's open pipeline.

A layer blob is one of LSMT, ZFile(LSMT), tar(LSMT) or tar(ZFile(LSMT)). Each wrapper is
peeled by turning one BlobSource into another (a slice for tar, a decompressing source for
ZFile), so the LSMT reader always sees the uncompressed LSMT byte space and never knows
where the bytes came from (a local file, a registry blob behind the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import FormatError
from ..format import lsmt, tar, zfile
from .source import BlobSource, SliceSource, read_exact
from .zfile_source import ZFileSource


@dataclass
class Unwrapped:
    """What the detection chain found: the LSMT byte space and the wrappers around it."""

    source: BlobSource  # LSMT bytes (decompressed, tar payload extracted)
    outer: BlobSource  # the raw blob as stored
    tar_payload: tuple[int, int] | None = None  # (offset, size) inside the outer blob
    zfile: ZFileSource | None = None

    @property
    def wrapping(self) -> list[str]:
        return (["tar"] if self.tar_payload else []) + (["zfile"] if self.zfile else []) + ["lsmt"]


async def unwrap(blob: BlobSource) -> Unwrapped:
    """Peel tar and ZFile wrappers off `blob`; raises FormatError for anything else."""
    if blob.size < 512:
        raise FormatError(
            f"blob of {blob.size} bytes is too small to be an overlaybd layer", source=blob.name, offset=0
        )
    head = await read_exact(blob, 0, min(blob.size, 1536))
    result = Unwrapped(source=blob, outer=blob)
    payload = tar.detect(head)
    if payload is not None:
        result.tar_payload = (payload.offset, payload.size)
        result.source = SliceSource(blob, payload.offset, payload.size, name=blob.name)
        head = await read_exact(result.source, 0, min(result.source.size, 512))
    if zfile.is_zfile(head):
        result.zfile = await ZFileSource.open(result.source)
        result.source = result.zfile
    return result


@dataclass
class CommittedLayer:
    """A sealed read-only LSMT layer: its index in memory, its data behind `source`."""

    name: str
    source: BlobSource
    header: lsmt.HeaderTrailer
    trailer: lsmt.HeaderTrailer
    mappings: list[lsmt.Mapping]
    unwrapped: Unwrapped
    index_offset: int = 0
    raw_index_entries: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def virtual_size(self) -> int:
        return self.trailer.virtual_size or self.header.virtual_size

    async def aclose(self) -> None:
        await self.unwrapped.source.aclose()


async def open_committed_layer(blob: BlobSource) -> CommittedLayer:
    """Open a committed (or sealed) LSMT layer in any wrapping."""
    unwrapped = await unwrap(blob)
    src = unwrapped.source
    name = blob.name
    if src.size < 2 * lsmt.HT_SIZE:
        raise FormatError(
            f"LSMT layer of {src.size} bytes is smaller than its header and trailer", source=name, offset=0
        )
    try:
        header = lsmt.parse_header_trailer(await read_exact(src, 0, lsmt.HT_SIZE), source=name, offset=0)
    except FormatError as e:
        if unwrapped.tar_payload is None and unwrapped.zfile is None:
            raise FormatError(
                f"not an overlaybd layer (no tar, ZFile or LSMT header): {e.message}", source=name, offset=0
            ) from e
        raise
    trailer_at = src.size - lsmt.HT_SIZE
    trailer = lsmt.parse_header_trailer(
        await read_exact(src, trailer_at, lsmt.HT_SIZE), source=name, offset=trailer_at
    )
    index_offset, index_len = lsmt.committed_index_range(header, trailer, src.size, source=name)
    index_bytes = await read_exact(src, index_offset, index_len)
    mappings = lsmt.decode_committed_index(index_bytes, index_offset, source=name)
    return CommittedLayer(
        name=name,
        source=src,
        header=header,
        trailer=trailer,
        mappings=mappings,
        unwrapped=unwrapped,
        index_offset=index_offset,
        raw_index_entries=index_len // 16,
    )
