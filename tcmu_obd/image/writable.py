"""The writable (RW) LSMT layer: a data file plus an index log (spec §1.4), file I/O at the edge.

Theory of operation
-------------------
Log-structured layer (upstream default): every write appends its bytes at the data file's
EOF and then appends one 16-byte record {offset, length, moffset} to the index file; a
discard appends a zeroed record. The in-memory `segment_map` is the replay of that log.
Records go to disk strictly after their data, so a crash can leave unreferenced bytes at
the end of the data file (harmless: the next write appends after them) or a torn last
index record (ignored on open and cut off before we append again) but never a record
pointing at garbage. A data file whose unflushed tail was lost (shorter than its last
records say) has those last records dropped at open; flushed writes are never among them. Nothing is fsynced until `fsync()`; a write is acknowledged once
both files have the bytes.

Sparse layer (`-s`): the data file is a 1:1 sparse copy of the disk at byte 4096+offset;
there is no index log, the map is rebuilt at open from SEEK_DATA/SEEK_HOLE, and a discard
punches a hole. Like upstream, this means the map after a reopen is at filesystem-block
granularity and punched ranges become holes (so a lower layer shows through them).

Files are used through os.pread/os.pwrite on raw fds (no Python buffering), synchronous;
the async image runs these calls in an executor.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import uuid as uuidlib
from pathlib import Path

from ..errors import FormatError, ObdError
from ..format import lsmt
from ..format.lsmt import HT_SIZE, SECTOR, Mapping, SegmentMap

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


class CompressionUnavailable(ObdError):
    """-z / -t output asked for, but tcmu_obd.tools.zfile cannot be imported."""


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE|KEEP_SIZE); False when the filesystem cannot punch."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        mv = mv[n:]
        offset += n


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    left = length
    while left > 0:
        b = os.pread(fd, min(left, 64 << 20), offset)
        if not b:
            break
        chunks.append(b)
        left -= len(b)
        offset += len(b)
    return b"".join(chunks)


def _check_aligned(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset/length ({offset}, {length})")
    if offset % SECTOR or length % SECTOR:
        raise ValueError(f"offset {offset} and length {length} must be multiples of {SECTOR}")


class WritableLayer:
    """An open RW layer. Build it with `create` or `open`."""

    def __init__(self, *, data_path: Path, index_path: Path | None, data_fd: int, index_fd: int | None,
                 header: lsmt.HeaderTrailer, segment_map: SegmentMap, data_end: int, index_end: int,
                 read_only: bool):
        self.data_path = data_path
        self.index_path = index_path
        self._data_fd: int | None = data_fd
        self._index_fd = index_fd
        self._header = header
        self._vsize = header.virtual_size
        self.segment_map = segment_map
        self._data_end = data_end  # bytes; next append position (log-structured)
        self._index_end = index_end  # bytes; next record position
        self.read_only = read_only

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, data_path: str | os.PathLike, index_path: str | os.PathLike | None, virtual_size: int, *,
               sparse: bool = False, uuid: str | None = None, parent_uuid: str | None = None) -> "WritableLayer":
        """Create a new RW layer (files must not exist), like upstream create_file_rw."""
        if virtual_size < 0:
            raise ValueError("virtual size must not be negative")
        uuid = lsmt.normalize_uuid(uuid or str(uuidlib.uuid4()))
        parent_uuid = lsmt.normalize_uuid(parent_uuid, what="parent uuid")
        data_path = Path(data_path)
        flags = lsmt.FLAGS_RW_SPARSE_DATA if sparse else lsmt.FLAGS_RW_DATA
        header = lsmt.build_header_trailer(flags=flags, virtual_size=virtual_size, uuid=uuid,
                                           parent_uuid=parent_uuid)
        created: list[Path] = []
        dfd = ifd = None
        try:
            dfd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created.append(data_path)
            if index_path is not None:
                ifd = os.open(index_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created.append(Path(index_path))
            _pwrite_all(dfd, header, 0)
            if sparse:
                os.ftruncate(dfd, virtual_size + HT_SIZE)
            else:
                if ifd is None:
                    raise ValueError("a log-structured layer needs an index file")
                ih = lsmt.build_header_trailer(flags=lsmt.FLAGS_RW_INDEX, virtual_size=virtual_size, uuid=uuid,
                                               parent_uuid=parent_uuid, index_offset=HT_SIZE)
                _pwrite_all(ifd, ih, 0)
        except BaseException:
            for p in created:
                os.unlink(p)
            raise
        finally:
            for fd in (dfd, ifd):
                if fd is not None:
                    os.close(fd)
        return cls.open(data_path, index_path)

    @classmethod
    def open(cls, data_path: str | os.PathLike, index_path: str | os.PathLike | None, *,
             read_only: bool = False) -> "WritableLayer":
        """Open an existing RW layer and rebuild its map (FormatError names the bad file)."""
        data_path = Path(data_path)
        index_path = Path(index_path) if index_path is not None else None
        mode = os.O_RDONLY if read_only else os.O_RDWR
        dfd = os.open(data_path, mode)
        ifd = None
        try:
            dsrc = str(data_path)
            dsize = os.fstat(dfd).st_size
            raw = _pread_exact(dfd, HT_SIZE, 0)
            if len(raw) < HT_SIZE:
                raise FormatError(f"data file too short for an LSMT header ({dsize} bytes)", source=dsrc, offset=0)
            header = lsmt.parse_header_trailer(raw, source=dsrc, offset=0)
            if not header.is_header or not header.is_data_file:
                raise FormatError(f"not an RW data file header (flags {header.flags:#x})", source=dsrc, offset=28)
            if header.is_sealed:
                raise FormatError("data file is sealed (a committed layer), not writable", source=dsrc, offset=28)
            if dsize % SECTOR and not read_only:
                # A torn append left a partial sector no record points at; pad it so the
                # next append (and every moffset) stays sector-aligned.
                os.ftruncate(dfd, dsize + (-dsize) % SECTOR)
                dsize += (-dsize) % SECTOR
            if header.is_sparse:
                maps = cls._sparse_mappings(dfd, dsize)
                sm = SegmentMap.from_sorted(maps)
                index_end = 0
                if index_path is not None and index_path.exists():
                    ifd = os.open(index_path, mode)
                vsize_header = header
            else:
                if index_path is None:
                    raise FormatError("log-structured RW layer needs its index file", source=dsrc)
                ifd = os.open(index_path, mode)
                vsize_header, sm, index_end = cls._load_log(ifd, str(index_path), dsize // SECTOR, read_only)
            layer = cls(data_path=data_path, index_path=index_path, data_fd=dfd, index_fd=ifd,
                        header=header, segment_map=sm, data_end=dsize, index_end=index_end,
                        read_only=read_only)
            # upstream takes the virtual size from the index header of a log-structured layer
            layer._vsize = vsize_header.virtual_size
            return layer
        except BaseException:
            os.close(dfd)
            if ifd is not None:
                os.close(ifd)
            raise

    @staticmethod
    def _load_log(ifd: int, isrc: str, data_sectors: int, read_only: bool):
        isize = os.fstat(ifd).st_size
        raw = _pread_exact(ifd, HT_SIZE, 0)
        if len(raw) < HT_SIZE:
            raise FormatError(f"index file too short for an LSMT header ({isize} bytes)", source=isrc, offset=0)
        ih = lsmt.parse_header_trailer(raw, source=isrc, offset=0)
        if not ih.is_header or ih.is_data_file or ih.is_sealed:
            raise FormatError(f"not an RW index file header (flags {ih.flags:#x})", source=isrc, offset=28)
        if ih.index_offset != HT_SIZE:
            raise FormatError(f"RW index_offset is {ih.index_offset}, expected {HT_SIZE}", source=isrc, offset=32)
        count, torn = divmod(isize - HT_SIZE, lsmt.ENTRY_SIZE)
        if count > lsmt.MAX_RW_INDEX:
            raise FormatError(f"RW index has {count} entries, more than {lsmt.MAX_RW_INDEX}", source=isrc,
                              offset=HT_SIZE)
        index_end = HT_SIZE + count * lsmt.ENTRY_SIZE
        if torn:
            log.warning("%s: ignoring a torn %d-byte record at offset %d", isrc, torn, index_end)
        # A torn tail of the data file: the last records point past its end (a crash, or a
        # filesystem that lost the unsynced end of the data). Their writes were never flushed
        # (a flush syncs the data before the index), so they are dropped; an out-of-bounds
        # record followed by a good one is corruption and still fails in the replay below.
        dropped = 0
        while index_end > HT_SIZE:
            last = list(lsmt.iter_entries(_pread_exact(ifd, lsmt.ENTRY_SIZE, index_end - lsmt.ENTRY_SIZE)))
            if not last or lsmt.moffset_in_bounds(last[0][1], lsmt.DATA_START_SECTOR, data_sectors):
                break
            index_end -= lsmt.ENTRY_SIZE
            dropped += 1
        if dropped:
            log.warning("%s: dropping the last %d record(s): they point past the end of the data file "
                        "(%d sectors), whose tail was lost", isrc, dropped, data_sectors)
        if (torn or dropped) and not read_only:
            os.ftruncate(ifd, index_end)
        sm = SegmentMap()
        pos = HT_SIZE
        chunk = (_READ_CHUNK // lsmt.ENTRY_SIZE) * lsmt.ENTRY_SIZE
        while pos < index_end:
            buf = _pread_exact(ifd, min(chunk, index_end - pos), pos)
            if len(buf) < min(chunk, index_end - pos):
                raise FormatError("index file shrank while reading", source=isrc, offset=pos + len(buf))
            lsmt.replay_rw_log(buf, data_sectors, into=sm, source=isrc, base_offset=pos)
            pos += len(buf)
        return ih, sm, index_end

    @staticmethod
    def _sparse_mappings(dfd: int, dsize: int) -> list[Mapping]:
        maps: list[Mapping] = []
        pos = HT_SIZE
        while pos < dsize:
            try:
                begin = os.lseek(dfd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(dfd, begin, os.SEEK_HOLE)
            length = (end - begin) // SECTOR
            first = (begin - HT_SIZE) // SECTOR
            maps.extend(lsmt.split_extent(first, length, begin // SECTOR))
            if end <= begin:
                break
            pos = end
        return maps

    # ------------------------------------------------------------------ properties

    @property
    def virtual_size(self) -> int:
        return self._vsize

    @property
    def sparse(self) -> bool:
        return self._header.is_sparse

    @property
    def uuid(self) -> str:
        return self._header.uuid

    @property
    def parent_uuid(self) -> str:
        return self._header.parent_uuid

    @property
    def closed(self) -> bool:
        return self._data_fd is None

    def __repr__(self) -> str:
        kind = "sparse" if self.sparse else "log"
        return f"<WritableLayer {kind} {self.data_path} vsize={self._vsize} mappings={len(self.segment_map)}>"

    def __enter__(self) -> "WritableLayer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fd(self) -> int:
        if self._data_fd is None:
            raise ValueError("layer is closed")
        return self._data_fd

    def _writable_fd(self) -> int:
        fd = self._fd()
        if self.read_only:
            raise ValueError("layer opened read-only")
        return fd

    # ------------------------------------------------------------------ I/O

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at byte `offset` (both 512-aligned). Returns once data+index are written."""
        fd = self._writable_fd()
        mv = memoryview(data).cast("B")
        _check_aligned(offset, len(mv))
        if self._vsize and offset + len(mv) > self._vsize:
            raise ValueError(f"write [{offset}, {offset + len(mv)}) past the virtual size {self._vsize}")
        pos = 0
        while pos < len(mv):
            piece = mv[pos: pos + lsmt.MAX_IO_SIZE]
            off = offset + pos
            if self.sparse:
                _pwrite_all(fd, piece, HT_SIZE + off)
                m = Mapping(off // SECTOR, len(piece) // SECTOR, (HT_SIZE + off) // SECTOR)
                self.segment_map.insert(m)
            else:
                at = self._data_end
                _pwrite_all(fd, piece, at)
                self._data_end = at + len(piece)
                m = Mapping(off // SECTOR, len(piece) // SECTOR, at // SECTOR)
                self._append_records([m])
                self.segment_map.insert(m)
            pos += len(piece)

    def discard(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (zeroed mappings / punched hole)."""
        fd = self._writable_fd()
        _check_aligned(offset, length)
        if length == 0:
            return
        if self._vsize and offset + length > self._vsize:
            raise ValueError(f"discard [{offset}, {offset + length}) past the virtual size {self._vsize}")
        if self.sparse:
            pieces = lsmt.split_extent(offset // SECTOR, length // SECTOR, 0, zeroed=True)
            pieces = [Mapping(p.offset, p.length, p.offset + lsmt.DATA_START_SECTOR, True) for p in pieces]
            if not _punch_hole(fd, HT_SIZE + offset, length):
                self._write_zeros(fd, HT_SIZE + offset, length)
            for p in pieces:
                self.segment_map.insert(p)
            return
        pieces = lsmt.split_extent(offset // SECTOR, length // SECTOR, self._data_end // SECTOR, zeroed=True)
        self._append_records(pieces)
        for p in pieces:
            self.segment_map.insert(p)

    @staticmethod
    def _write_zeros(fd: int, offset: int, length: int) -> None:
        zero = bytes(min(length, _READ_CHUNK))
        while length > 0:
            n = min(length, len(zero))
            _pwrite_all(fd, zero[:n], offset)
            offset += n
            length -= n

    def _append_records(self, maps: list[Mapping]) -> None:
        if self._index_fd is None:
            raise ValueError("layer has no index file")
        rec = lsmt.encode_mappings(maps)
        _pwrite_all(self._index_fd, rec, self._index_end)
        self._index_end += len(rec)

    def read_data(self, moffset: int, length: int) -> bytes:
        """`length` sectors of the data file at sector `moffset` (what a data mapping points at)."""
        fd = self._fd()
        n = length * SECTOR
        b = _pread_exact(fd, n, moffset * SECTOR)
        if len(b) < n:
            raise FormatError(f"data file ends inside mapped data ({len(b)} of {n} bytes)",
                              source=str(self.data_path), offset=moffset * SECTOR + len(b))
        return b

    def read(self, offset: int, length: int) -> bytes:
        """This layer alone, as a disk: holes and zeroed runs read as zeros (aligned I/O)."""
        _check_aligned(offset, length)
        out = bytearray(length)
        base = offset // SECTOR
        for p_off, p_len, m in self.segment_map.lookup(base, length // SECTOR):
            if m is not None and not m.zeroed:
                at = (p_off - base) * SECTOR
                out[at: at + p_len * SECTOR] = self.read_data(m.moffset, m.length)
        return bytes(out)

    def fsync(self) -> None:
        """Make every acknowledged write durable: data first, then the index."""
        os.fsync(self._fd())
        if self._index_fd is not None and not self.sparse:
            os.fsync(self._index_fd)

    def close(self) -> None:
        """Close both files (idempotent). Does not fsync."""
        fd, self._data_fd = self._data_fd, None
        ifd, self._index_fd = self._index_fd, None
        if fd is not None:
            os.close(fd)
        if ifd is not None:
            os.close(ifd)

    def set_virtual_size(self, n: int) -> None:
        """Set the virtual size and write it to the headers (stack rule: an upper with vsize 0
        takes the lowers'). A sparse data file is resized to n + 4096 like upstream."""
        fd = self._writable_fd()
        if n < 0:
            raise ValueError("virtual size must not be negative")
        hdr = _pread_exact(fd, HT_SIZE, 0)
        _pwrite_all(fd, lsmt.with_virtual_size(hdr, n), 0)
        if self.sparse:
            os.ftruncate(fd, n + HT_SIZE)
            self._data_end = n + HT_SIZE
        elif self._index_fd is not None:
            ih = _pread_exact(self._index_fd, HT_SIZE, 0)
            _pwrite_all(self._index_fd, lsmt.with_virtual_size(ih, n), 0)
        self._vsize = n

    # ------------------------------------------------------------------ commit / seal

    def commit(self, out_path: str | os.PathLike, *, uuid: str | None = None, parent_uuid: str | None = None,
               user_tag: bytes | str = b"", algorithm: str | None = None, block_size: int = 4096,
               tar: bool = False) -> None:
        """Write a committed layer of the current contents to `out_path` (must not exist).

        Same bytes as upstream overlaybd-commit: uuid defaults to the null uuid (upstream
        only sets it from --uuid), parent_uuid to this layer's parent. With `algorithm`
        ("lz4"/"zstd") and/or `tar`, the raw LSMT goes to a temporary file next to out_path
        and is then compressed / tar-wrapped by tcmu_obd.tools.zfile.
        """
        self._fd()
        out_path = Path(out_path)
        if algorithm is not None and algorithm not in ("lz4", "zstd"):
            raise ValueError(f"unknown algorithm {algorithm!r} (lz4 or zstd)")
        uuid = lsmt.normalize_uuid(uuid)
        parent = lsmt.normalize_uuid(parent_uuid, what="parent uuid") if parent_uuid else self.parent_uuid
        if isinstance(user_tag, str):
            user_tag = user_tag.encode()
        if len(user_tag) > lsmt.USER_TAG_SIZE:
            raise ValueError(f"commit message too long ({len(user_tag)} > {lsmt.USER_TAG_SIZE} bytes)")
        # upstream reads the virtual size from the data file's header
        vsize = lsmt.parse_header_trailer(_pread_exact(self._fd(), HT_SIZE, 0), source=str(self.data_path)).virtual_size
        plan = lsmt.plan_commit(self.segment_map.mappings())
        header, index, trailer = lsmt.build_committed_layer_parts(
            plan, virtual_size=vsize, uuid=uuid, parent_uuid=parent, user_tag=user_tag)
        if algorithm is None and not tar:
            write_committed_blob(out_path, header, plan, index, trailer, self.read_data)
            return
        if out_path.exists():
            raise FileExistsError(errno.EEXIST, "output exists", str(out_path))
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.lsmt.tmp")
        try:
            write_committed_blob(tmp, header, plan, index, trailer, self.read_data)
            wrap_committed_blob(tmp, out_path, algorithm=algorithm, block_size=block_size, tar=tar)
        finally:
            if tmp.exists():
                tmp.unlink()

    def seal(self) -> None:
        """upstream close_seal: append the sorted index and a sealed trailer to the data file
        (which becomes a read-only layer, `overlaybd.sealed`), then close."""
        fd = self._writable_fd()
        end = os.fstat(fd).st_size
        if end % SECTOR:
            raise FormatError("data file end is not sector-aligned", source=str(self.data_path), offset=end)
        tail = lsmt.build_sealed_tail(self.segment_map.mappings(), end, virtual_size=self._vsize,
                                      uuid=self.uuid, parent_uuid=self.parent_uuid, sparse=self.sparse)
        _pwrite_all(fd, tail, end)
        os.fsync(fd)
        self.close()


def write_committed_blob(out_path: Path, header: bytes, plan: lsmt.CommitPlan, index: bytes, trailer: bytes,
                         read_data) -> None:
    """Write header, the planned data copies (read through read_data(moffset, length)), index
    and trailer to a new file (O_EXCL), streaming the data in bounded pieces."""
    step = lsmt.MAX_IO_SIZE // SECTOR
    with open(out_path, "xb") as f:
        try:
            f.write(header)
            for m, _dest in plan.copies:
                pos = 0
                while pos < m.length:
                    n = min(step, m.length - pos)
                    f.write(read_data(m.moffset + pos, n))
                    pos += n
            f.write(index)
            f.write(trailer)
        except BaseException:
            f.close()
            os.unlink(out_path)
            raise


def wrap_committed_blob(src: Path, dst: Path, *, algorithm: str | None, block_size: int, tar: bool) -> None:
    """Compress (zfile) and/or tar-wrap a finished raw LSMT blob into dst."""
    try:
        # imported late: the zfile tools import much more than a plain commit needs
        from ..tools import zfile as zfile_tools
    except ImportError as e:
        raise CompressionUnavailable(f"zfile/tar output is not available: {e}") from e

    if algorithm is not None:
        zfile_tools.compress_file(src, dst, algorithm=algorithm, block_size=block_size, tar=tar)
    else:
        zfile_tools.tar_wrap_file(src, dst)
