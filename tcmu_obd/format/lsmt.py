"""LSMT (overlaybd's log-structured merge tree layer) codec — sans-IO.

Theory of operation
-------------------
An overlaybd layer maps a virtual disk (in 512-byte *sectors*) onto bytes of a blob through
an index of 16-byte `Mapping`s {offset, length, moffset, zeroed, tag} (spec §1.2).

* A *committed* layer is one blob `[header 4096][data][index][trailer 4096]` (§1.3). The index
  is sorted and non-overlapping; the trailer says where it is. `committed_index_range` does
  upstream's checks on header/trailer before anyone reads the index (a hostile `index_size`
  must never turn into a giant read), and `decode_committed_index` validates order and bounds.
* A *writable* layer is a data file plus an append-only index *log* (§1.4): later records
  override earlier ones. `replay_rw_index` folds the log into a sorted, non-overlapping map.
* A stack of layers is merged top-down (§1.5): the highest layer with *any* mapping (data or
  zeroed) over a sector wins; `merge_stack` does it with one sweep per layer.
* Committing (`plan_commit`, `build_committed_layer_parts`) reproduces upstream's compact()
  byte for byte: data is copied in index order from sector 8 in 32 KiB steps, each step
  becoming one index entry, and then neighbours are merged by compress_raw_index's rule.
  That is why a 16383-sector source mapping comes out as 16320 + 63: the merge only joins
  while the sum stays *below* MAX_LENGTH.

Nothing here touches files: callers hand in bytes and get structures or bytes back.
Errors about the input are `FormatError` naming the source and byte offset; errors about
the caller's arguments are `ValueError`.
"""

from __future__ import annotations

import re
import struct
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from ..errors import FormatError

SECTOR = 512
HT_SIZE = 4096
MAX_LENGTH = 16383  # 14-bit length field
INVALID_OFFSET = (1 << 50) - 1
MAX_OFFSET = INVALID_OFFSET
MAX_MOFFSET = (1 << 55) - 1
MAX_RO_INDEX = 1_000_000
MAX_RW_INDEX = 128_000_000
MAX_LAYERS = 255
MAX_IO_SIZE = 4 * 1024 * 1024  # upstream splits reads/writes into pieces of this size
ENTRY_SIZE = 16
HT_STRUCT_SIZE = 390
USER_TAG_SIZE = 256
DATA_START_SECTOR = HT_SIZE // SECTOR  # 8: first data sector of any data file
# compact() copies data through a 32 KiB buffer and emits one index entry per buffer-full;
# the merge step then joins them. Reproducing the step size is what makes us byte-identical.
COMMIT_COPY_SECTORS = 32 * 1024 // SECTOR
INDEX_PAD_ENTRIES = 4096 // ENTRY_SIZE  # committed index is padded to whole 4 KiB blocks

MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657e63d29444084ca2d2c8ec4fcfae8a")  # photon UUID d2637e65-4494-4c08-...
NULL_UUID = "00000000-0000-0000-0000-000000000000"
LSMT_V1 = 1
LSMT_SUB_V1 = 1

FLAG_HEADER = 1 << 0
FLAG_DATA = 1 << 1
FLAG_SEALED = 1 << 2
FLAG_SPARSE = 1 << 4

# Header flags written by upstream's tools (spec §1.1).
FLAGS_COMMITTED_HEADER = FLAG_HEADER | FLAG_DATA | FLAG_SEALED  # 7
FLAGS_COMMITTED_TRAILER = FLAG_DATA | FLAG_SEALED  # 6
FLAGS_RW_DATA = FLAG_HEADER | FLAG_DATA  # 3
FLAGS_RW_SPARSE_DATA = FLAG_HEADER | FLAG_DATA | FLAG_SPARSE  # 0x13
FLAGS_RW_INDEX = FLAG_HEADER  # 1

_HT_FIXED = struct.Struct("<8s16sIIQQQ37s37sHBB256s")
assert _HT_FIXED.size == HT_STRUCT_SIZE
_ENTRY = struct.Struct("<QQ")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_MASK50 = (1 << 50) - 1
_MASK55 = (1 << 55) - 1
_INVALID_ENTRY = _ENTRY.pack(INVALID_OFFSET, 0)


# --------------------------------------------------------------------------------------------
# Mapping


@dataclass(frozen=True, slots=True)
class Mapping:
    """One index entry; every field is in 512-byte sectors. `tag` = layer index at runtime."""

    offset: int
    length: int
    moffset: int
    zeroed: bool = False
    tag: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def mend(self) -> int:
        # Upstream's mend() of a zeroed mapping is its moffset (it owns no data); the
        # commit merge rule depends on this, so two adjacent zeroed runs do merge.
        return self.moffset if self.zeroed else self.moffset + self.length

    def slice(self, start: int, stop: int) -> "Mapping":
        """The part of this mapping over sectors [start, stop) (must lie inside it)."""
        if start == self.offset and stop == self.offset + self.length:
            return self
        moffset = self.moffset if self.zeroed else self.moffset + (start - self.offset)
        return Mapping(start, stop - start, moffset, self.zeroed, self.tag)

    def with_tag(self, tag: int) -> "Mapping":
        if tag == self.tag:
            return self
        return Mapping(self.offset, self.length, self.moffset, self.zeroed, tag)


def split_extent(offset: int, length: int, moffset: int, zeroed: bool = False) -> list[Mapping]:
    """Split a run into mappings of at most MAX_LENGTH sectors.

    Zeroed pieces all keep `moffset` (they own no data, like upstream's discard loop);
    data pieces advance it.
    """
    if offset < 0 or length < 0 or moffset < 0:
        raise ValueError("negative extent")
    out = []
    while length > 0:
        n = min(length, MAX_LENGTH)
        out.append(Mapping(offset, n, moffset, zeroed))
        offset += n
        length -= n
        if not zeroed:
            moffset += n
    return out


# --------------------------------------------------------------------------------------------
# Entry codec


def decode_mappings(buf: bytes | bytearray | memoryview) -> list[Mapping]:
    """Decode packed 16-byte entries; drop padding (offset == INVALID_OFFSET); tag forced to 0.

    A trailing partial entry is ignored (the caller decides whether that is an error).
    """
    mv = memoryview(buf)
    n = len(mv) // ENTRY_SIZE
    out = []
    append = out.append
    for lo, hi in _ENTRY.iter_unpack(mv[: n * ENTRY_SIZE]):
        offset = lo & _MASK50
        if offset == INVALID_OFFSET:
            continue
        append(Mapping(offset, lo >> 50, hi & _MASK55, bool((hi >> 55) & 1), 0))
    return out


def encode_mapping(m: Mapping) -> bytes:
    if not (0 <= m.offset <= MAX_OFFSET and 0 <= m.length <= MAX_LENGTH and 0 <= m.moffset <= MAX_MOFFSET
            and 0 <= m.tag <= 255):
        raise ValueError(f"mapping out of range: {m}")
    lo = m.offset | (m.length << 50)
    hi = m.moffset | (int(bool(m.zeroed)) << 55) | (m.tag << 56)
    return _ENTRY.pack(lo, hi)


def encode_mappings(maps: Iterable[Mapping]) -> bytes:
    return b"".join(encode_mapping(m) for m in maps)


def invalid_entries(n: int) -> bytes:
    """`n` padding entries (offset = INVALID_OFFSET, everything else 0)."""
    return _INVALID_ENTRY * n


# --------------------------------------------------------------------------------------------
# HeaderTrailer


def normalize_uuid(value: str | None, *, what: str = "uuid") -> str:
    """36-char upper-case uuid; None/"" = the null uuid. ValueError if malformed."""
    if value is None or value == "":
        return NULL_UUID
    if not isinstance(value, str) or not _UUID_RE.match(value):
        raise ValueError(f"invalid {what} {value!r} (want 8-4-4-4-12 hex digits)")
    return value.upper()


def is_valid_uuid(value: str) -> bool:
    return isinstance(value, str) and bool(_UUID_RE.match(value))


@dataclass(frozen=True)
class HeaderTrailer:
    flags: int
    index_offset: int  # bytes
    index_size: int  # number of 16-byte entries
    virtual_size: int  # bytes
    uuid: str
    parent_uuid: str
    version: int = LSMT_V1
    sub_version: int = LSMT_SUB_V1
    user_tag: bytes = b""

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_trailer(self) -> bool:
        return not self.is_header

    @property
    def is_data_file(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_index_file(self) -> bool:
        return not self.is_data_file

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    @property
    def has_parent(self) -> bool:
        return self.parent_uuid.strip("0-") != ""


def _cstr(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace")


def parse_header_trailer(buf: bytes | bytearray | memoryview, *, source: str | None = None,
                         offset: int = 0) -> HeaderTrailer:
    """Parse a 4096-byte (at least 390-byte) header/trailer area found at byte `offset`.

    Raises FormatError on a short buffer, bad magic or a size field other than 390.
    Flags are not judged here: what a header must be depends on the file's role.
    """
    if len(buf) < HT_STRUCT_SIZE:
        raise FormatError(f"LSMT header/trailer truncated ({len(buf)} of {HT_SIZE} bytes)",
                          source=source, offset=offset)
    (magic0, magic1, size, flags, index_offset, index_size, vsize, uuid, parent, _reserved,
     version, sub_version, tag) = _HT_FIXED.unpack_from(bytes(buf[:HT_STRUCT_SIZE]))
    if magic0 != MAGIC0 or magic1 != MAGIC1:
        raise FormatError("not an LSMT header/trailer (bad magic)", source=source, offset=offset)
    if size != HT_STRUCT_SIZE:
        raise FormatError(f"LSMT header/trailer size field is {size}, expected {HT_STRUCT_SIZE}",
                          source=source, offset=offset + 24)
    return HeaderTrailer(flags=flags, index_offset=index_offset, index_size=index_size,
                         virtual_size=vsize, uuid=_cstr(uuid), parent_uuid=_cstr(parent),
                         version=version, sub_version=sub_version, user_tag=tag.rstrip(b"\x00"))


def build_header_trailer(*, flags: int, virtual_size: int, uuid: str | None = None,
                         parent_uuid: str | None = None, index_offset: int = 0, index_size: int = 0,
                         user_tag: bytes | str = b"", version: int = LSMT_V1,
                         sub_version: int = LSMT_SUB_V1) -> bytes:
    """Exactly HT_SIZE bytes, laid out as upstream's write_header_trailer does."""
    if isinstance(user_tag, str):
        user_tag = user_tag.encode()
    if len(user_tag) > USER_TAG_SIZE:
        raise ValueError(f"user tag too long ({len(user_tag)} > {USER_TAG_SIZE} bytes)")
    if virtual_size < 0 or index_offset < 0 or index_size < 0:
        raise ValueError("negative header field")
    u = normalize_uuid(uuid).encode() + b"\x00"
    p = normalize_uuid(parent_uuid, what="parent uuid").encode() + b"\x00"
    fixed = _HT_FIXED.pack(MAGIC0, MAGIC1, HT_STRUCT_SIZE, flags, index_offset, index_size,
                           virtual_size, u, p, 0, version, sub_version, user_tag)
    return fixed + bytes(HT_SIZE - HT_STRUCT_SIZE)


def with_virtual_size(header_area: bytes, virtual_size: int) -> bytes:
    """The same 4096-byte area with virtual_size replaced (upstream update_header_vsize)."""
    b = bytearray(header_area)
    struct.pack_into("<Q", b, 48, virtual_size)
    return bytes(b)


# --------------------------------------------------------------------------------------------
# Committed layers: locate and validate the index


def committed_index_range(header: HeaderTrailer, trailer: HeaderTrailer, blob_size: int, *,
                          source: str | None = None) -> tuple[int, int]:
    """Where the index of a committed (or sealed) layer is: (byte offset, byte length).

    Does upstream's checks (header: header + data file; trailer: trailer + data + sealed;
    index_size <= MAX_RO_INDEX; index fits between the header and the trailer) before a
    single index byte is read.
    """
    trailer_offset = blob_size - HT_SIZE
    if blob_size < 2 * HT_SIZE:
        raise FormatError(f"blob too small for an LSMT layer ({blob_size} bytes)", source=source, offset=0)
    if not header.is_header:
        raise FormatError("LSMT header area is flagged as a trailer", source=source, offset=28)
    if not header.is_data_file:
        raise FormatError("LSMT header says index file, a layer blob must be a data file",
                          source=source, offset=28)
    toff = trailer_offset + 28
    if trailer.is_header:
        raise FormatError("LSMT trailer area is flagged as a header", source=source, offset=toff)
    if not trailer.is_data_file:
        raise FormatError("LSMT trailer is not a data-file trailer", source=source, offset=toff)
    if not trailer.is_sealed:
        raise FormatError("LSMT trailer is not sealed", source=source, offset=toff)
    if trailer.index_size > MAX_RO_INDEX:
        raise FormatError(f"LSMT index_size {trailer.index_size} exceeds {MAX_RO_INDEX} entries",
                          source=source, offset=trailer_offset + 40)
    if trailer.index_offset < HT_SIZE or trailer.index_offset > trailer_offset:
        raise FormatError(f"LSMT index_offset {trailer.index_offset} outside [{HT_SIZE}, {trailer_offset}]",
                          source=source, offset=trailer_offset + 32)
    nbytes = trailer.index_size * ENTRY_SIZE
    if nbytes > trailer_offset - trailer.index_offset:
        raise FormatError(f"LSMT index ({trailer.index_size} entries at {trailer.index_offset}) "
                          f"runs past the trailer at {trailer_offset}",
                          source=source, offset=trailer_offset + 40)
    return trailer.index_offset, nbytes


def _fmt(m: Mapping) -> str:
    z = " zeroed" if m.zeroed else ""
    return f"{{offset {m.offset}, length {m.length}, moffset {m.moffset}{z}}}"


def decode_committed_index(index_bytes: bytes | bytearray | memoryview, index_offset: int, *,
                           source: str | None = None) -> list[Mapping]:
    """Decode and validate a committed index found at byte `index_offset` of its blob.

    Entries must be strictly ordered and non-overlapping and every moffset must lie in
    [8, index_offset/512) (zeroed: up to and including the end). Padding is dropped, tags
    are forced to 0, zero-length entries are dropped after validation.
    """
    if len(index_bytes) % ENTRY_SIZE:
        raise FormatError(f"LSMT index length {len(index_bytes)} is not a multiple of {ENTRY_SIZE}",
                          source=source, offset=index_offset)
    end_sector = index_offset // SECTOR
    out: list[Mapping] = []
    prev_end = -1
    for i, m in iter_entries(index_bytes):
        where = index_offset + i * ENTRY_SIZE
        if m.offset < prev_end:
            raise FormatError(f"LSMT index out of order or overlapping: {_fmt(m)} starts before "
                              f"sector {prev_end} where the previous mapping ends",
                              source=source, offset=where)
        if not moffset_in_bounds(m, DATA_START_SECTOR, end_sector):
            raise FormatError(f"mapping {_fmt(m)} points outside the data area "
                              f"[sector {DATA_START_SECTOR}, {end_sector})", source=source, offset=where)
        prev_end = m.offset + m.length
        if m.length:
            out.append(m)
    return out


# --------------------------------------------------------------------------------------------
# SegmentMap: sorted, non-overlapping interval map


class SegmentMap:
    """Sorted, non-overlapping mappings with override-on-insert (upstream's Index0).

    Two parallel lists (start sectors, Mapping objects) searched with bisect: lookup is
    O(log n + k); insert is O(log n + k) plus a list splice, O(1) amortised for appends.
    """

    __slots__ = ("_starts", "_maps")

    def __init__(self, maps: Iterable[Mapping] = ()):
        self._starts: list[int] = []
        self._maps: list[Mapping] = []
        for m in maps:
            self.insert(m)

    @classmethod
    def from_sorted(cls, maps: Iterable[Mapping]) -> "SegmentMap":
        """Build from mappings already sorted and non-overlapping (checked; ValueError if not)."""
        sm = cls()
        prev_end = -1
        starts = sm._starts
        lst = sm._maps
        for m in maps:
            if m.length == 0:
                continue
            if m.offset < prev_end:
                raise ValueError(f"mappings not sorted/non-overlapping at {m}")
            starts.append(m.offset)
            lst.append(m)
            prev_end = m.offset + m.length
        return sm

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._maps)

    def __repr__(self) -> str:
        return f"<SegmentMap {len(self._maps)} mappings>"

    def mappings(self) -> list[Mapping]:
        return list(self._maps)

    def copy(self) -> "SegmentMap":
        sm = SegmentMap()
        sm._starts = list(self._starts)
        sm._maps = list(self._maps)
        return sm

    @property
    def end(self) -> int:
        """Sector just past the last mapping (0 when empty)."""
        return self._maps[-1].end if self._maps else 0

    def insert(self, m: Mapping) -> None:
        """Insert `m`, overriding (trimming/splitting/removing) whatever it overlaps."""
        if m.length <= 0:
            return
        starts, maps = self._starts, self._maps
        s = m.offset
        e = s + m.length
        if not maps or maps[-1].offset + maps[-1].length <= s:
            starts.append(s)
            maps.append(m)
            return
        i = bisect_right(starts, s) - 1
        if i < 0 or maps[i].offset + maps[i].length <= s:
            i += 1
        j = bisect_left(starts, e, i)
        if i == j:
            starts.insert(i, s)
            maps.insert(i, m)
            return
        new = []
        first = maps[i]
        if first.offset < s:
            new.append(first.slice(first.offset, s))
        new.append(m)
        last = maps[j - 1]
        if last.offset + last.length > e:
            new.append(last.slice(e, last.offset + last.length))
        maps[i:j] = new
        starts[i:j] = [x.offset for x in new]

    def _first_index(self, offset: int) -> int:
        """Index of the first mapping that ends after `offset`."""
        i = bisect_right(self._starts, offset) - 1
        if i < 0:
            return 0
        m = self._maps[i]
        return i if m.offset + m.length > offset else i + 1

    def overlapping(self, offset: int, length: int) -> list[Mapping]:
        """Mappings overlapping [offset, offset+length), trimmed to it (no hole pieces)."""
        out = []
        end = offset + length
        maps = self._maps
        i = self._first_index(offset)
        n = len(maps)
        while i < n:
            m = maps[i]
            if m.offset >= end:
                break
            a = max(m.offset, offset)
            b = min(m.offset + m.length, end)
            out.append(m.slice(a, b))
            i += 1
        return out

    def covering(self, offset: int, length: int) -> Mapping | None | bool:
        """The common case of `lookup` without building a list: the mapping (untrimmed) that
        covers all of [offset, offset+length), None when no mapping touches the range (all
        hole), False when the range spans several pieces (use `lookup`). length must be > 0.

        A small read nearly always falls inside one extent; this answers it with one bisect
        and no allocation, which matters on the per-command path of the frontends."""
        end = offset + length
        i = bisect_right(self._starts, offset) - 1
        if i >= 0:
            m = self._maps[i]
            m_end = m.offset + m.length
            if m_end >= end:
                return m
            if m_end > offset:
                return False
        i += 1
        if i < len(self._starts) and self._starts[i] < end:
            return False
        return None

    def lookup(self, offset: int, length: int) -> list[tuple[int, int, Mapping | None]]:
        """Pieces exactly covering [offset, offset+length): (offset, length, mapping|None).

        Each mapping is trimmed to its piece; None marks a hole (no mapping).
        """
        if length <= 0:
            return []
        out: list[tuple[int, int, Mapping | None]] = []
        cur = offset
        for m in self.overlapping(offset, length):
            if m.offset > cur:
                out.append((cur, m.offset - cur, None))
            out.append((m.offset, m.length, m))
            cur = m.offset + m.length
        end = offset + length
        if cur < end:
            out.append((cur, end - cur, None))
        return out


# --------------------------------------------------------------------------------------------
# Writable (log-structured) index replay


def moffset_in_bounds(m: Mapping, begin: int, end: int) -> bool:
    """upstream's within(): data must lie in sectors [begin, end); zeroed needs begin <= moffset <= end."""
    if m.zeroed:
        return begin <= m.moffset <= end
    return begin <= m.moffset < end and m.moffset + m.length <= end


def iter_entries(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, Mapping]]:
    """(entry number, mapping) for each non-padding entry of packed 16-byte entries; tag
    forced to 0; a trailing partial entry is ignored."""
    mv = memoryview(buf)
    n = len(mv) // ENTRY_SIZE
    for i, (lo, hi) in enumerate(_ENTRY.iter_unpack(mv[: n * ENTRY_SIZE])):
        offset = lo & _MASK50
        if offset != INVALID_OFFSET:
            yield i, Mapping(offset, lo >> 50, hi & _MASK55, bool((hi >> 55) & 1), 0)


def replay_rw_log(buf: bytes | bytearray | memoryview, data_sectors: int, *, into: SegmentMap | None = None,
                  source: str | None = None, base_offset: int = HT_SIZE) -> SegmentMap:
    """Replay packed RW index records (file order, later wins) into `into` (or a new map).

    `buf` holds the records found at byte `base_offset` of the index file (so a caller can
    feed a big log in chunks); every moffset must lie in [8, data_sectors) (zeroed: <=),
    as upstream's create_memory_index0 requires. Padding entries are skipped.
    """
    sm = SegmentMap() if into is None else into
    for i, m in iter_entries(buf):
        if not moffset_in_bounds(m, DATA_START_SECTOR, data_sectors):
            raise FormatError(f"RW index entry {_fmt(m)} points outside the data file "
                              f"[sector {DATA_START_SECTOR}, {data_sectors})",
                              source=source, offset=base_offset + i * ENTRY_SIZE)
        sm.insert(m)
    return sm


def replay_rw_index(maps: Iterable[Mapping], data_sectors: int, *, source: str | None = None,
                    index_offset: int = HT_SIZE) -> list[Mapping]:
    """Fold an RW index log (file order, later wins) into sorted non-overlapping mappings.

    Every entry's moffset must lie in [8, data_sectors) (zeroed: <= data_sectors), as
    upstream's create_memory_index0 requires. `index_offset` is only used to name the byte
    offset of a bad entry (assuming no padding entries were dropped before it); use
    `replay_rw_log` on the raw bytes for exact offsets.
    """
    sm = SegmentMap()
    for i, m in enumerate(maps):
        if not moffset_in_bounds(m, DATA_START_SECTOR, data_sectors):
            raise FormatError(f"RW index entry {i} {_fmt(m)} points outside the data file "
                              f"[sector {DATA_START_SECTOR}, {data_sectors})",
                              source=source, offset=index_offset + i * ENTRY_SIZE)
        sm.insert(m.with_tag(0))
    return sm.mappings()


# --------------------------------------------------------------------------------------------
# Stack merge


def _fill_gaps(upper: list[Mapping], lower: Sequence[Mapping]) -> list[Mapping]:
    """Pieces of `lower` not covered by `upper` (both sorted, non-overlapping)."""
    out = []
    j = 0
    nu = len(upper)
    for lm in lower:
        s = lm.offset
        e = s + lm.length
        while j < nu and upper[j].offset + upper[j].length <= s:
            j += 1
        cur = s
        k = j
        while k < nu and upper[k].offset < e:
            u = upper[k]
            if u.offset > cur:
                out.append(lm.slice(cur, u.offset))
            ue = u.offset + u.length
            if ue > cur:
                cur = ue
            k += 1
        if cur < e:
            out.append(lm.slice(cur, e) if cur > s else lm)
    return out


def merge_stack(layers: Sequence[Sequence[Mapping]]) -> SegmentMap:
    """Merge per-layer indexes given bottom -> top; mapping.tag = index in `layers`.

    The top-most layer that maps a sector (data or zeroed) wins; unmapped sectors stay holes.
    Each layer must itself be sorted and non-overlapping.
    """
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"too many layers ({len(layers)} > {MAX_LAYERS})")
    result: list[Mapping] = []
    for idx in range(len(layers) - 1, -1, -1):
        tagged = [m if m.tag == idx else m.with_tag(idx) for m in layers[idx] if m.length > 0]
        _check_sorted(tagged, idx)
        if not result:
            result = tagged
            continue
        pieces = _fill_gaps(result, tagged)
        if pieces:
            # Timsort merges the two sorted runs in linear time.
            result = sorted(result + pieces, key=_offset_key)
    return SegmentMap.from_sorted(result)


def _offset_key(m: Mapping) -> int:
    return m.offset


def _check_sorted(maps: Sequence[Mapping], layer: int) -> None:
    prev = -1
    for m in maps:
        if m.offset < prev:
            raise ValueError(f"layer {layer} index is not sorted/non-overlapping at {m}")
        prev = m.offset + m.length


# --------------------------------------------------------------------------------------------
# Commit


class _Compactor:
    """compress_raw_index as a stream over plain ints (no object per input piece)."""

    __slots__ = ("out", "off", "len", "moff", "zeroed", "tag")

    def __init__(self) -> None:
        self.out: list[Mapping] = []
        self.len = -1  # -1: nothing pending
        self.off = self.moff = self.tag = 0
        self.zeroed = False

    def add(self, off: int, length: int, moff: int, zeroed: bool, tag: int) -> None:
        n = self.len
        if (n >= 0 and self.off + n == off and self.zeroed == zeroed and self.tag == tag
                and (self.moff if zeroed else self.moff + n) == moff and n + length < MAX_LENGTH):
            self.len = n + length
            return
        if n >= 0:
            self.out.append(Mapping(self.off, n, self.moff, self.zeroed, self.tag))
        self.off, self.len, self.moff, self.zeroed, self.tag = off, length, moff, zeroed, tag

    def finish(self) -> list[Mapping]:
        if self.len >= 0:
            self.out.append(Mapping(self.off, self.len, self.moff, self.zeroed, self.tag))
            self.len = -1
        return self.out


def compact_mappings(maps: Iterable[Mapping]) -> list[Mapping]:
    """upstream compress_raw_index: join a mapping into its predecessor when offsets and
    moffsets (mend rule) are contiguous, zeroed and tag are equal and the combined length
    stays strictly below MAX_LENGTH."""
    c = _Compactor()
    for m in maps:
        c.add(m.offset, m.length, m.moffset, m.zeroed, m.tag)
    return c.finish()


@dataclass
class CommitPlan:
    """What a committed layer will contain.

    copies: (source mapping, destination moffset in sectors) for each data mapping, in the
    order its bytes must be written starting at byte 4096; index: the final (merged,
    unpadded) index; index_offset: byte offset of the index = end of data.
    """

    copies: list[tuple[Mapping, int]] = field(default_factory=list)
    index: list[Mapping] = field(default_factory=list)
    data_sectors: int = 0

    @property
    def index_offset(self) -> int:
        return (DATA_START_SECTOR + self.data_sectors) * SECTOR

    @property
    def padded_entries(self) -> int:
        n = len(self.index)
        return -(-n // INDEX_PAD_ENTRIES) * INDEX_PAD_ENTRIES

    @property
    def blob_size(self) -> int:
        return self.index_offset + self.padded_entries * ENTRY_SIZE + HT_SIZE


def plan_commit(maps: Iterable[Mapping]) -> CommitPlan:
    """Plan a committed layer for `maps` (sorted, non-overlapping, e.g. a replayed RW index).

    Data mappings are laid out from sector 8 in order; each is cut into 32 KiB pieces (one
    index entry per compact() copy step) which the compactor joins back where it may.
    """
    plan = CommitPlan()
    c = _Compactor()
    add = c.add
    cursor = DATA_START_SECTOR
    step = COMMIT_COPY_SECTORS
    for m in maps:
        length = m.length
        if length <= 0:
            continue
        if m.zeroed:
            add(m.offset, length, cursor, True, m.tag)
            continue
        plan.copies.append((m, cursor))
        off = m.offset
        tag = m.tag
        while length > 0:
            n = step if length > step else length
            add(off, n, cursor, False, tag)
            off += n
            cursor += n
            length -= n
    plan.index = c.finish()
    plan.data_sectors = cursor - DATA_START_SECTOR
    return plan


def encode_padded_index(index: Sequence[Mapping], multiple: int = INDEX_PAD_ENTRIES) -> bytes:
    """Encode and pad with invalid entries to a multiple of `multiple` entries."""
    pad = (-len(index)) % multiple
    return encode_mappings(index) + invalid_entries(pad)


def build_committed_layer_parts(plan: CommitPlan, *, virtual_size: int, uuid: str | None = None,
                                parent_uuid: str | None = None,
                                user_tag: bytes | str = b"") -> tuple[bytes, bytes, bytes]:
    """(header, padded index, trailer) of the committed blob; data goes between header and
    index as `plan.copies` says."""
    header = build_header_trailer(flags=FLAGS_COMMITTED_HEADER, virtual_size=virtual_size, uuid=uuid,
                                  parent_uuid=parent_uuid, user_tag=user_tag)
    index = encode_padded_index(plan.index)
    trailer = build_header_trailer(flags=FLAGS_COMMITTED_TRAILER, virtual_size=virtual_size, uuid=uuid,
                                   parent_uuid=parent_uuid, user_tag=user_tag,
                                   index_offset=plan.index_offset, index_size=len(index) // ENTRY_SIZE)
    return header, index, trailer


def build_sealed_tail(maps: Sequence[Mapping], data_end: int, *, virtual_size: int, uuid: str | None,
                      parent_uuid: str | None, sparse: bool = False) -> bytes:
    """What upstream close_seal appends to an RW data file whose EOF is `data_end` bytes:
    the sorted index padded to 512 bytes, then a trailer (flags 6, index_size = real count)."""
    if data_end % SECTOR:
        raise ValueError("data file end must be 512-aligned to seal")
    index = encode_padded_index(maps, SECTOR // ENTRY_SIZE)
    flags = FLAGS_COMMITTED_TRAILER | (FLAG_SPARSE if sparse else 0)
    trailer = build_header_trailer(flags=flags, virtual_size=virtual_size, uuid=uuid,
                                   parent_uuid=parent_uuid, index_offset=data_end, index_size=len(maps))
    return index + trailer


@dataclass(frozen=True)
class CommittedIndex:
    header: HeaderTrailer
    trailer: HeaderTrailer
    index_offset: int  # bytes
    mappings: list[Mapping]


def load_committed_layer(blob: bytes | bytearray | memoryview, *, source: str | None = None) -> CommittedIndex:
    """Parse a whole committed (or sealed) layer held in memory: header, trailer, index.

    For small blobs and tests; the image stack reads only the three areas it needs.
    """
    size = len(blob)
    if size < 2 * HT_SIZE:
        raise FormatError(f"blob too small for an LSMT layer ({size} bytes)", source=source, offset=0)
    header = parse_header_trailer(blob[:HT_SIZE], source=source, offset=0)
    trailer = parse_header_trailer(blob[size - HT_SIZE:], source=source, offset=size - HT_SIZE)
    index_offset, nbytes = committed_index_range(header, trailer, size, source=source)
    maps = decode_committed_index(blob[index_offset: index_offset + nbytes], index_offset, source=source)
    return CommittedIndex(header, trailer, index_offset, maps)
