"""ZFile: overlaybd's block-compressed file container (spec §2). Sans-IO: bytes in, plans out.

Layout::

    [header 512][dict: dict_size bytes][block 0 (+crc)][block 1 (+crc)]...[index: n x u32][trailer 512]

Theory of operation (reading):

1. `parse_header_trailer` the first 512 bytes. Only bits 0..5 of `flags` mean anything: 2021-era
   writers left garbage in the high bits and in unused bytes, so neither is checked. When the
   digest bit is set the CRC32C-raw over the whole 512-byte area (digest field zeroed) must match.
2. `needs_trailer(header)`: a header rewritten at the end of the build ("header_overwrite")
   already carries the index location; otherwise the 512-byte trailer at EOF does.
   `index_info` picks whichever carries it and `index_location` bounds it against the blob, so a
   hostile `index_size` can never make the caller allocate more than the blob holds.
3. `JumpTable.from_index` turns the u32 array of stored block lengths (each including the 4-byte
   CRC when `verify`) into prefix-sum offsets; `plan_reads` coalesces consecutive blocks into
   one read, and `decode_block` checks the CRC and decompresses one block.

Upstream caps one block plus CRC at its 64 KiB read buffer; a `--bs 64` block that does not
compress is stored larger than that and upstream cannot read it. We impose no such cap: a
block's stored size is bounded only by the blob.

Writing (`ZFileWriter`) mirrors upstream's builder so that, when the compressor output agrees,
the bytes agree: a placeholder header (flags header|data|digest), each block compressed and
followed by its CRC, then the index, then a sealed trailer. With `overwrite_header` (what
`overlaybd-commit -z` does) the final header also carries the index info (flags 0x1B); without
it (what `overlaybd-zfile` does) the placeholder stays (flags 0x13).
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from dataclasses import dataclass, replace
from itertools import accumulate

import lz4.block
import zstandard

from ..errors import ChecksumError, FormatError
from .crc import BLOCK_CRC_SEED, crc32c_raw

HEADER_SIZE = 512
STRUCT_SIZE = 96
MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = b"tuji.yyf@Alibaba"

FLAG_HEADER = 1 << 0  # set in the header, clear in the trailer
FLAG_DATA = 1 << 1  # a data file (always set by writers)
FLAG_SEALED = 1 << 2  # trailer written: the file is complete
FLAG_HEADER_OVERWRITE = 1 << 3  # header rewritten at the end with the index info
FLAG_DIGEST = 1 << 4  # digest and index_crc are valid
FLAG_INDEX_COMPRESSED = 1 << 5  # defined upstream, never written or honoured
KNOWN_FLAGS = 0x3F

ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGORITHMS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
ALGO_NAMES = {0: "mini-lzo", ALGO_LZ4: "lz4", ALGO_ZSTD: "zstd"}

CRC_SIZE = 4
ZSTD_LEVEL = 3  # upstream always compresses zstd at level 3, whatever the header says
MAX_INDEX_ENTRIES = 1_000_000_000  # upstream's sanity cap on index_size
# Upstream reads at most 64 KiB blocks; we accept up to 1 MiB (a power of two) so an odd but
# honest file still reads, while a hostile block_size cannot make decode allocate gigabytes.
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
WRITER_BLOCK_SIZES = (4096, 8192, 16384, 32768, 65536)
DEFAULT_READ_BATCH_BYTES = 1 << 20

# offset 0..95: magic0, magic1, size, digest, flags, index_offset, index_size, original_file_size,
# index_crc, reserved, block_size, algo, level, use_dict, padding, reserved2, dict_size, verify,
# then 7 padding bytes (not part of the format; may hold garbage in old files).
_STRUCT = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7x")
_DIGEST_OFFSET = 28

_LITTLE = sys.byteorder == "little"


def is_zfile(first_bytes: bytes | bytearray | memoryview) -> bool:
    """True if `first_bytes` start with both ZFile magics (needs at least 24 bytes)."""
    b = bytes(first_bytes[:24])
    return len(b) == 24 and b[:8] == MAGIC0 and b[8:24] == MAGIC1


@dataclass(frozen=True)
class ZFileHeader:
    """One 512-byte header or trailer area (both share the layout)."""

    flags: int
    index_offset: int = 0  # bytes
    index_size: int = 0  # number of blocks (u32 entries), not bytes
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = 4096
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: int = 1
    size: int = STRUCT_SIZE
    digest: int = 0
    reserved: int = 0
    padding: int = 0
    reserved2: int = 0

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_trailer(self) -> bool:
        return not self.flags & FLAG_HEADER

    @property
    def is_data(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def header_overwrite(self) -> bool:
        return bool(self.flags & FLAG_HEADER_OVERWRITE)

    @property
    def has_digest(self) -> bool:
        return bool(self.flags & FLAG_DIGEST)

    @property
    def algorithm_name(self) -> str:
        return ALGO_NAMES.get(self.algo, f"unknown({self.algo})")

    @property
    def n_blocks_for_size(self) -> int:
        """Blocks needed to hold original_file_size (block_size must be valid)."""
        return -(-self.original_file_size // self.block_size)


def parse_header_trailer(
    buf512: bytes | bytearray | memoryview, *, source: str | None = None, offset: int = 0
) -> ZFileHeader:
    """Parse a 512-byte header or trailer area.

    Returns the fields as stored; the caller decides whether it wanted a header or a trailer.
    Raises FormatError if the buffer is short or the magic is wrong, ChecksumError if the
    digest bit is set and the digest does not match.
    """
    raw = bytes(buf512[:HEADER_SIZE])
    if len(raw) < HEADER_SIZE:
        raise FormatError(
            f"zfile header/trailer needs {HEADER_SIZE} bytes, got {len(raw)}", source=source, offset=offset
        )
    (m0, m1, size, digest, flags, index_offset, index_size, original, index_crc, reserved, block_size,
     algo, level, use_dict, padding, reserved2, dict_size, verify) = _STRUCT.unpack_from(raw)
    if m0 != MAGIC0 or m1 != MAGIC1:
        raise FormatError("not a zfile header/trailer (bad magic)", source=source, offset=offset)
    flags &= KNOWN_FLAGS  # high bits are garbage in 2021-era files
    if flags & FLAG_DIGEST:
        zeroed = raw[:_DIGEST_OFFSET] + b"\0\0\0\0" + raw[_DIGEST_OFFSET + 4:]
        actual = crc32c_raw(zeroed)
        if actual != digest:
            raise ChecksumError(
                f"zfile {'header' if flags & FLAG_HEADER else 'trailer'} digest mismatch "
                f"(stored {digest:#010x}, computed {actual:#010x})",
                source=source,
                offset=offset + _DIGEST_OFFSET,
            )
    return ZFileHeader(
        flags=flags, index_offset=index_offset, index_size=index_size, original_file_size=original,
        index_crc=index_crc, block_size=block_size, algo=algo, level=level, use_dict=use_dict,
        dict_size=dict_size, verify=verify, size=size, digest=digest, reserved=reserved,
        padding=padding, reserved2=reserved2,
    )


def build_header_trailer(h: ZFileHeader) -> bytes:
    """Serialise `h` into a 512-byte area; the digest is computed when the digest flag is set
    (otherwise h.digest is written as given)."""
    packed = _STRUCT.pack(
        MAGIC0, MAGIC1, h.size, 0, h.flags, h.index_offset, h.index_size, h.original_file_size,
        h.index_crc, h.reserved, h.block_size, h.algo, h.level, h.use_dict, h.padding, h.reserved2,
        h.dict_size, h.verify,
    )
    area = bytearray(packed + bytes(HEADER_SIZE - len(packed)))
    digest = crc32c_raw(area) if h.flags & FLAG_DIGEST else h.digest
    struct.pack_into("<I", area, _DIGEST_OFFSET, digest)
    return bytes(area)


def check_header(header: ZFileHeader, *, source: str | None = None) -> None:
    """Checks on the first 512 bytes that do not need the rest of the blob.

    Raises FormatError: not a header, unsupported algorithm, implausible block size.
    """
    if not header.is_header:
        raise FormatError("zfile header area is flagged as a trailer", source=source, offset=0)
    if header.algo not in (ALGO_LZ4, ALGO_ZSTD):
        raise FormatError(
            f"unsupported zfile compression algorithm {header.algo} ({header.algorithm_name})",
            source=source, offset=76,
        )
    bs = header.block_size
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise FormatError(f"implausible zfile block size {bs}", source=source, offset=72)


def needs_trailer(header: ZFileHeader) -> bool:
    """True unless the header was overwritten with the final index info."""
    return not header.header_overwrite


def index_info(header: ZFileHeader, maybe_trailer: ZFileHeader | None) -> ZFileHeader:
    """The area that carries index_offset/index_size/index_crc (and whose digest bit says
    whether index_crc is valid): the header when overwritten, else the trailer."""
    if header.header_overwrite:
        return header
    if maybe_trailer is None:
        raise ValueError("this zfile needs its trailer")
    return maybe_trailer


def index_location(
    header: ZFileHeader, maybe_trailer: ZFileHeader | None, blob_size: int, *, source: str | None = None
) -> tuple[int, int]:
    """Where the index is: (index byte offset, number of blocks), after upstream's checks and
    a bound against `blob_size` so that reading it can never allocate more than the blob holds.

    Raises FormatError for a missing/wrong trailer, an index that does not fit, or a block
    count that does not match original_file_size.
    """
    check_header(header, source=source)
    if header.header_overwrite:
        info = header
        # The trailer is still there in practice, but an overwritten header does not need it.
        index_end_limit = blob_size
    else:
        if not header.is_data:
            raise FormatError("zfile header is not flagged as a data file", source=source, offset=32)
        trailer_offset = blob_size - HEADER_SIZE
        if maybe_trailer is None:
            raise FormatError("zfile needs its trailer", source=source, offset=max(trailer_offset, 0))
        t = maybe_trailer
        if t.is_header or not t.is_data or not t.is_sealed:
            raise FormatError(
                f"zfile trailer has flags {t.flags:#x} (need data|sealed, not header): "
                "file not sealed or truncated",
                source=source, offset=max(trailer_offset, 0),
            )
        info = t
        index_end_limit = trailer_offset
    n = info.index_size
    if n > MAX_INDEX_ENTRIES:
        raise FormatError(f"zfile index_size {n} exceeds {MAX_INDEX_ENTRIES}", source=source, offset=48)
    start = info.index_offset
    data_start = HEADER_SIZE + header.dict_size
    if start < data_start or start + 4 * n > index_end_limit:
        raise FormatError(
            f"zfile index [{start}, {start + 4 * n}) ({n} blocks) does not fit in the blob "
            f"(data starts at {data_start}, index must end by {index_end_limit})",
            source=source, offset=start,
        )
    # Every block takes at least 1 byte (5 with its CRC) before the index, so the data area
    # bounds the block count too: a hostile count cannot make us read an index larger than
    # the data it would describe.
    min_block = CRC_SIZE + 1 if header.verify else 1
    if n * min_block > start - data_start:
        raise FormatError(
            f"zfile index claims {n} blocks but the data area [{data_start}, {start}) cannot hold them",
            source=source, offset=48,
        )
    expected = -(-info.original_file_size // header.block_size)
    if n != expected:
        raise FormatError(
            f"zfile index has {n} blocks but original size {info.original_file_size} with block "
            f"size {header.block_size} needs {expected}",
            source=source, offset=48,
        )
    return start, n


@dataclass(frozen=True)
class ReadBatch:
    """One contiguous read of stored bytes covering `blocks` (indices)."""

    offset: int
    length: int
    blocks: range


class JumpTable:
    """Offsets of every stored block: block i occupies [offsets[i], offsets[i+1]) including its
    CRC. Kept as one array of u64 prefix sums (8 bytes a block)."""

    def __init__(self, offsets: array, *, block_size: int, original_size: int, verify: bool):
        self._offsets = offsets
        self.block_size = block_size
        self.original_size = original_size
        self.verify = verify
        self.n_blocks = len(offsets) - 1

    @classmethod
    def from_index(
        cls,
        index_bytes: bytes | bytearray | memoryview,
        header: ZFileHeader,
        info: ZFileHeader | None = None,
        *,
        source: str | None = None,
        index_offset: int | None = None,
    ) -> "JumpTable":
        """Build from the raw index (n x u32 LE).

        `header` supplies block size, dict size and verify; `info` (default `header`) is the area
        carrying index_crc and the digest bit that says whether to check it.
        Raises ChecksumError (index CRC) or FormatError (bad entry, blocks overrunning the index).
        """
        info = header if info is None else info
        where = info.index_offset if index_offset is None else index_offset
        if len(index_bytes) % 4:
            raise FormatError(f"zfile index is {len(index_bytes)} bytes, not a multiple of 4",
                              source=source, offset=where)
        if info.has_digest:
            actual = crc32c_raw(index_bytes)
            if actual != info.index_crc:
                raise ChecksumError(
                    f"zfile index CRC mismatch (stored {info.index_crc:#010x}, computed {actual:#010x})",
                    source=source, offset=where,
                )
        lengths = array("I")
        lengths.frombytes(bytes(index_bytes))
        if not _LITTLE:
            lengths.byteswap()
        minimum = CRC_SIZE + 1 if header.verify else 1
        if lengths and min(lengths) < minimum:
            bad = next(i for i, v in enumerate(lengths) if v < minimum)
            raise FormatError(
                f"zfile index entry {bad} is {lengths[bad]} bytes (must be >= {minimum})",
                source=source, offset=where + 4 * bad,
            )
        base = HEADER_SIZE + header.dict_size
        offsets = array("Q", accumulate(lengths, initial=base))
        end = offsets[-1]
        if where and end > where:
            raise FormatError(f"zfile blocks end at {end}, past the index at {where}",
                              source=source, offset=where)
        return cls(offsets, block_size=header.block_size, original_size=info.original_file_size,
                   verify=bool(header.verify))

    def block_range(self, i: int) -> tuple[int, int]:
        """(offset, stored length including CRC) of block i."""
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block {i} out of range (0..{self.n_blocks - 1})")
        start = self._offsets[i]
        return start, self._offsets[i + 1] - start

    def raw_len(self, i: int) -> int:
        """Decompressed length of block i (the last one may be short)."""
        if i == self.n_blocks - 1:
            return self.original_size - i * self.block_size
        return self.block_size

    @property
    def data_end(self) -> int:
        return self._offsets[-1]

    def blocks_for(self, offset: int, length: int) -> range:
        """Indices of the blocks holding [offset, offset+length), clamped to the original size."""
        end = min(offset + length, self.original_size)
        if length <= 0 or offset >= end:
            return range(0)
        return range(offset // self.block_size, (end - 1) // self.block_size + 1)

    def plan_reads(self, blocks: range, max_bytes: int = DEFAULT_READ_BATCH_BYTES) -> list[ReadBatch]:
        """Coalesce stored bytes of consecutive `blocks` into reads of at most `max_bytes`
        (a single block bigger than that still gets one read of its own)."""
        out: list[ReadBatch] = []
        if not blocks:
            return out
        first = blocks.start
        off = self._offsets
        for i in range(blocks.start + 1, blocks.stop):
            if off[i + 1] - off[first] > max_bytes:
                out.append(ReadBatch(off[first], off[i] - off[first], range(first, i)))
                first = i
        out.append(ReadBatch(off[first], off[blocks.stop] - off[first], range(first, blocks.stop)))
        return out


def _load_system_lz4():
    """LZ4_compress_default from the system liblz4, if there is one.

    python-lz4's block.compress(mode="default") picks different matches from the C library's
    LZ4_compress_default on some inputs (observed with both at lz4 1.9.4), so its output is
    valid but not byte-identical to upstream's. Calling the system library directly gives
    the same bytes as overlaybd; python-lz4 is the fallback. ctypes drops the GIL during the
    call, so worker threads compress in parallel.
    """
    try:
        import ctypes
        import ctypes.util

        try:  # the soname first: find_library runs `ldconfig -p`, tens of ms at every start
            lib = ctypes.CDLL("liblz4.so.1")
        except OSError:
            lib = ctypes.CDLL(ctypes.util.find_library("lz4") or "liblz4.so")
        fn = lib.LZ4_compress_default
        bound = lib.LZ4_compressBound
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    bound.argtypes = [ctypes.c_int]
    bound.restype = ctypes.c_int

    def compress(raw) -> bytes:
        src = bytes(raw)
        cap = bound(len(src))
        dst = ctypes.create_string_buffer(cap)
        n = fn(src, dst, len(src), cap)
        if n <= 0:
            raise ValueError("LZ4_compress_default failed")
        return dst.raw[:n]

    try:
        if lz4.block.decompress(compress(b"probe" * 20), uncompressed_size=100) != b"probe" * 20:
            return None
    except Exception:  # a broken or foreign library: fall back to python-lz4
        return None
    return compress


def _python_lz4_compress(raw) -> bytes:
    return lz4.block.compress(raw, mode="default", store_size=False)


lz4_compress_default = _load_system_lz4() or _python_lz4_compress

_zstd_local = threading.local()


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    # Contexts are cheap to reuse but not safe to share across threads: one per thread.
    d = getattr(_zstd_local, "d", None)
    if d is None:
        d = _zstd_local.d = zstandard.ZstdDecompressor()
    return d


def _zstd_compressor() -> zstandard.ZstdCompressor:
    # Upstream compresses with ZSTD_compress(level 3): one frame with the content size and
    # no checksum; these parameters give the same frame.
    c = getattr(_zstd_local, "c", None)
    if c is None:
        c = _zstd_local.c = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_content_size=True, write_checksum=False)
    return c


def compress_block(raw: bytes | bytearray | memoryview, algo: int) -> bytes:
    """Compress one block the way upstream does (no CRC). Pure and thread-safe, so builders
    may run it in worker threads (lz4 via ctypes and zstd both release the GIL)."""
    if algo == ALGO_LZ4:
        return lz4_compress_default(raw)  # raw LZ4 block, no size prefix
    if algo == ALGO_ZSTD:
        return _zstd_compressor().compress(raw)
    raise ValueError(f"unsupported compression algorithm {algo}")


def decode_block(
    stored: bytes | bytearray | memoryview,
    *,
    algo: int,
    verify: bool | int,
    block_size: int,
    expected_len: int,
    source: str | None = None,
    offset: int | None = None,
    index: int | None = None,
) -> bytes:
    """Check and decompress one stored block (compressed bytes + CRC when `verify`).

    Returns exactly `expected_len` bytes. Raises ChecksumError for a CRC mismatch and
    FormatError for anything the decompressor rejects or a wrong decompressed size; both
    name the block index and its offset in the zfile.
    """
    what = f"block {index}" if index is not None else "block"
    if not 0 < expected_len <= block_size:
        raise FormatError(f"{what}: expected length {expected_len} outside 1..{block_size}",
                          source=source, offset=offset)
    mv = memoryview(stored)
    if verify:
        if len(mv) <= CRC_SIZE:
            raise FormatError(f"{what}: stored length {len(mv)} too short for data + CRC",
                              source=source, offset=offset)
        payload = mv[:-CRC_SIZE]
        (want,) = struct.unpack_from("<I", mv, len(mv) - CRC_SIZE)
        got = crc32c_raw(payload, BLOCK_CRC_SEED)
        if got != want:
            raise ChecksumError(
                f"{what}: CRC mismatch (stored {want:#010x}, computed {got:#010x})",
                source=source, offset=offset,
            )
    else:
        payload = mv
    try:
        if algo == ALGO_LZ4:
            # A destination of exactly expected_len makes LZ4 reject a block that would
            # decompress to more, so a hostile block cannot overrun.
            out = lz4.block.decompress(payload, uncompressed_size=expected_len)
        elif algo == ALGO_ZSTD:
            params = zstandard.get_frame_parameters(payload)
            if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, expected_len):
                raise FormatError(
                    f"{what}: zstd frame claims {params.content_size} bytes, expected {expected_len}",
                    source=source, offset=offset,
                )
            out = _zstd_decompressor().decompress(payload, max_output_size=expected_len)
        else:
            raise FormatError(f"unsupported compression algorithm {algo}", source=source, offset=offset)
    except FormatError:
        raise
    except (lz4.block.LZ4BlockError, zstandard.ZstdError, ValueError) as e:
        raise FormatError(f"{what}: cannot decompress ({ALGO_NAMES.get(algo, algo)}): {e}",
                          source=source, offset=offset) from e
    if len(out) != expected_len:
        raise FormatError(f"{what}: decompressed to {len(out)} bytes, expected {expected_len}",
                          source=source, offset=offset)
    return out


class ZFileWriter:
    """Sans-IO ZFile builder: the caller writes what each call returns, in order, then writes
    `final_header` over the first 512 bytes.

    Usage::

        w = ZFileWriter("lz4")
        out.write(w.header_placeholder())
        for chunk in chunks_of(block_size):       # every chunk full except the last
            out.write(w.add_block(chunk))
        tail, header = w.finish(total_size)
        out.write(tail); out.seek(0); out.write(header)
    """

    def __init__(
        self,
        algorithm: str = "lz4",
        block_size: int = 4096,
        verify: bool = True,
        *,
        overwrite_header: bool = True,
    ):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r} (lz4 or zstd)")
        if block_size not in WRITER_BLOCK_SIZES:
            raise ValueError(f"block size {block_size} not one of {WRITER_BLOCK_SIZES}")
        self.algo = ALGORITHMS[algorithm]
        self.block_size = block_size
        self.verify = bool(verify)
        self.overwrite_header = overwrite_header
        self._lengths = array("I")
        self._position = HEADER_SIZE
        self._raw_total = 0
        self._short_seen = False
        self._finished = False

    def _base(self, flags: int, **kw) -> ZFileHeader:
        # Upstream stores level 0 whatever the algorithm (observed in every fixture).
        return ZFileHeader(flags=flags, block_size=self.block_size, algo=self.algo, level=0,
                           verify=int(self.verify), **kw)

    def header_placeholder(self) -> bytes:
        """The first 512 bytes as written before any block (flags header|data|digest)."""
        return build_header_trailer(self._base(FLAG_HEADER | FLAG_DATA | FLAG_DIGEST))

    def compress(self, raw: bytes | bytearray | memoryview) -> bytes:
        """Compress one block (no CRC); thread-safe, so callers may run it in worker threads."""
        return compress_block(raw, self.algo)

    def add_block(self, raw: bytes | bytearray | memoryview) -> bytes:
        """Compress one block of `block_size` bytes (the last may be shorter); returns the
        stored bytes (compressed data + CRC when verify)."""
        return self.add_compressed(self.compress(raw), len(raw))

    def add_compressed(self, compressed: bytes, raw_len: int) -> bytes:
        """Record a block compressed elsewhere (see `compress`); returns the stored bytes."""
        if self._finished:
            raise ValueError("writer already finished")
        if not 0 < raw_len <= self.block_size:
            raise ValueError(f"block of {raw_len} bytes (block size {self.block_size})")
        if self._short_seen:
            raise ValueError("only the last block may be shorter than the block size")
        if raw_len < self.block_size:
            self._short_seen = True
        stored = compressed
        if self.verify:
            stored = compressed + struct.pack("<I", crc32c_raw(compressed, BLOCK_CRC_SEED))
        self._lengths.append(len(stored))
        self._position += len(stored)
        self._raw_total += raw_len
        return stored

    @property
    def n_blocks(self) -> int:
        return len(self._lengths)

    def finish(self, original_size: int) -> tuple[bytes, bytes]:
        """Returns (tail, final_header): the index + trailer to append, and the 512 bytes to
        put at offset 0 (the placeholder again unless overwrite_header)."""
        if self._finished:
            raise ValueError("writer already finished")
        if original_size != self._raw_total:
            raise ValueError(f"original size {original_size} != {self._raw_total} bytes added")
        self._finished = True
        lengths = array("I", self._lengths)
        if not _LITTLE:
            lengths.byteswap()
        index = lengths.tobytes()
        info = dict(index_offset=self._position, index_size=len(self._lengths),
                    original_file_size=original_size, index_crc=crc32c_raw(index))
        trailer = build_header_trailer(self._base(FLAG_DATA | FLAG_SEALED | FLAG_DIGEST, **info))
        if self.overwrite_header:
            header = build_header_trailer(
                self._base(FLAG_HEADER | FLAG_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST, **info))
        else:
            header = self.header_placeholder()
        return index + trailer, header


def compress_bytes(
    data: bytes, algorithm: str = "lz4", block_size: int = 4096, verify: bool = True,
    *, overwrite_header: bool = True,
) -> bytes:
    """Whole-buffer convenience for tests and small blobs."""
    w = ZFileWriter(algorithm, block_size, verify, overwrite_header=overwrite_header)
    parts = [w.header_placeholder()]
    mv = memoryview(data)
    for i in range(0, len(mv), block_size):
        parts.append(w.add_block(mv[i:i + block_size]))
    tail, header = w.finish(len(mv))
    parts.append(tail)
    parts[0] = header
    return b"".join(parts)


def decompress_bytes(blob: bytes, *, source: str | None = None) -> bytes:
    """Whole-buffer decode (tests, small blobs): every check the streaming reader makes."""
    header = parse_header_trailer(blob[:HEADER_SIZE], source=source)
    check_header(header, source=source)
    trailer = None
    if needs_trailer(header):
        if len(blob) < 2 * HEADER_SIZE:
            raise FormatError(f"zfile of {len(blob)} bytes has no room for a trailer", source=source,
                              offset=len(blob))
        trailer = parse_header_trailer(blob[-HEADER_SIZE:], source=source, offset=len(blob) - HEADER_SIZE)
    start, n = index_location(header, trailer, len(blob), source=source)
    info = index_info(header, trailer)
    jt = JumpTable.from_index(blob[start:start + 4 * n], header, info, source=source, index_offset=start)
    out = bytearray()
    mv = memoryview(blob)
    for i in range(n):
        off, ln = jt.block_range(i)
        out += decode_block(mv[off:off + ln], algo=header.algo, verify=header.verify,
                            block_size=header.block_size, expected_len=jt.raw_len(i),
                            source=source, offset=off, index=i)
    return bytes(out)


def with_flags(h: ZFileHeader, flags: int) -> ZFileHeader:
    """Copy of `h` with other flags (tests and tools)."""
    return replace(h, flags=flags)
