"""BlobCache: one blob's sparse cache file, its durable presence map and its digest check.

Theory of operation
-------------------
Bytes arrive through `write(offset, data)` (from the scheduler, never from the network
directly). A write lands in the data file with pwrite, is marked present in the in-memory
PresenceMap (so readers see it at once) and is queued as *pending*. A flush makes pending
writes durable in this order, batched so throughput stays high:

    data pwrite (done) → fdatasync(data) → set bits in the durable map → pwrite+fsync(map)

A flush runs when `commit_bytes` are pending or `commit_interval` after the first pending write,
and on close. Bits are cleared durably (map fsync'ed) *before* a range is rewritten after a
discard. So a crash at any point leaves only bits that are backed by written bytes; a restart
resumes from the durable map.

Verification: the whole-blob sha256 is computed incrementally, in order, over the contiguous
present prefix, in an executor thread (hashlib releases the GIL on large buffers). When the last
byte is hashed the digest is compared:

* match, cache-dir blob: the map's `verified` flag is set; the blob is never fetched again;
* match, layer `dir` blob: `.download` is renamed to `<dir>/overlaybd.commit` (as upstream's
  background download does) and the map is removed;
* mismatch: the bits of the bad ranges are cleared durably, listeners hear "mismatch" and the
  scheduler refetches (upstream: force_download). The bad ranges are the ZFile blocks whose
  CRC fails when repair.locate_damage can name them; otherwise, or when the digest still fails
  after such a repair, every range (a plain blob's digest cannot tell which range was bad).

States (shown in repr): FILLING → VERIFIED, or → FILLING again after a mismatch.

Disk faults: a write the disk refuses (full, read-only, failing) closes the cache directory's
WriteGate (fileio.py) and raises CacheWriteError; the reader then gets its bytes straight
from the registry. A data file deleted or truncated under us (an admin, a cleaner, another
process) is noticed by an fstat on every read and write (nlink 0, size below the blob's) and
by short reads: the lost ranges are cleared durably, the file is recreated or re-extended,
and CacheLost tells the reader to fetch them again — a truncated file is never read as zeros.
Residual window: a truncation that lands between our fstat and our pwrite, followed by a
write that re-extends the file to full size, leaves a hole we cannot see; the digest check at
the end of the fill still catches it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import DigestMismatch, ImageIOError
from .fileio import DEFAULT_IO, FileIO, WriteGate
from .presence import PAGE_SIZE, PresenceMap
from .repair import locate_damage

log = logging.getLogger(__name__)

HASH_PIECE = 8 << 20
INLINE_IO_BYTES = 256 << 10

_bg_executor: ThreadPoolExecutor | None = None


def background_executor() -> ThreadPoolExecutor:
    """Threads for the cache's background work (fill writes, fdatasync, hashing), so that a
    slow fsync or a queue of fill writes never delays a device read in the default executor."""
    global _bg_executor
    if _bg_executor is None:
        _bg_executor = ThreadPoolExecutor(max_workers=3, thread_name_prefix="obd-cache-bg")
    return _bg_executor


class SimulatedCrash(Exception):
    """Raised by a test's fault hook to stop a flush half way (see tests/cache)."""


class CacheWriteError(ImageIOError):
    """The cache file refused a write (disk full, read-only, I/O error): serve around the cache."""


class CacheLost(ImageIOError):
    """Bytes the presence map promised are gone (file deleted, truncated, unreadable); the
    ranges are already cleared, so fetching them again is the remedy."""


class BlobCache:
    """One blob's cache. Create through CacheStore.open_blob (or directly in tests).

    `data_path`/`map_path`: the sparse data file and its side map. `commit_path`: for a
    layer with `dir`, where the verified blob ends up (`<dir>/overlaybd.commit`); None for a
    blob in the shared cache dir.
    """

    def __init__(
        self,
        *,
        digest: str,
        size: int,
        data_path: str,
        map_path: str,
        commit_path: str | None = None,
        commit_bytes: int = 64 << 20,
        commit_interval: float = 0.1,
        io: FileIO = DEFAULT_IO,
        fault_hook: Callable[[str], None] | None = None,
        verify_digest: bool = True,
        gate: WriteGate | None = None,
    ):
        self.digest = digest
        self.size = size
        self.data_path = data_path
        self.map_path = map_path
        self.commit_path = commit_path
        self.commit_bytes = commit_bytes
        self.commit_interval = commit_interval
        self.verify_digest = verify_digest and digest.startswith("sha256:")
        self._io = io
        self.gate = gate or WriteGate(os.path.dirname(data_path) or ".")
        self._recover_lock = asyncio.Lock()
        self.lost = 0  # times the data file was found deleted or truncated
        self._hook = fault_hook or (lambda stage: None)
        self.listeners: list[Callable[[str], None]] = []  # "flushed" / "verified" / "mismatch"
        self.mismatches = 0
        self.repaired_bytes = 0  # bytes dropped by a located repair after a mismatch (repair.py)
        self._repair_tried = False
        self.bytes_written = 0
        self._pending: list[tuple[int, int]] = []
        self._pending_bytes = 0
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._generation = 0  # bumped by discard_all: in-flight writes/hashes of an older one are void
        self._hash_task: asyncio.Task | None = None
        self._hasher = hashlib.sha256()
        self._hash_pos = 0
        self._closed = False
        self._verified_event = asyncio.Event()
        self._map_fd = -1
        self._fd = -1
        self._open()

    # --- open -------------------------------------------------------------------------------
    def _open(self) -> None:
        if self.commit_path and os.path.exists(self.commit_path):
            self._open_committed()
            return
        try:
            os.makedirs(os.path.dirname(self.data_path) or ".", exist_ok=True)
            ours = os.path.exists(self.map_path)  # created before our first write, kept until commit
            durable = PresenceMap.load(self.map_path, self.size)
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            st = os.fstat(self._fd)
            adopted: list[tuple[int, int]] = []
            if durable is None or st.st_size != self.size:
                durable = PresenceMap(self.size)
                if st.st_size != self.size:
                    os.ftruncate(self._fd, 0)
                    os.ftruncate(self._fd, self.size)
                elif self.size and not ours:
                    adopted = self._data_extents()
            self._map_fd = os.open(self.map_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._close_fds()
            raise ImageIOError(f"cannot open cache file {self.data_path}: {e.strerror}", e.errno) from e
        self.durable = durable
        self.presence = PresenceMap.from_bytes(durable.to_bytes(), self.size)
        self.verified = durable.verified and durable.complete
        for a, b in adopted:
            # a data file without our map (upstream's `.download` or file cache): trust its
            # allocated extents as upstream does (hole skipping); the digest check at the end
            # catches garbage, and the next flush makes them durable in our map
            self.presence.mark(a, b)
            self._pending.append((a, b))
            self._pending_bytes += b - a
        if adopted:
            log.info("%s: adopted %d bytes from an existing %s", self.digest[:19], self.presence.present_bytes, self.data_path)
        if self.verified:
            self._verified_event.set()
        else:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            if self.presence.first_missing(0) != 0:
                self._kick_hash()  # resume: hash what a previous run left

    def _data_extents(self) -> list[tuple[int, int]]:
        """Allocated ranges of the data file (SEEK_DATA/SEEK_HOLE); [] when unsupported."""
        out = []
        pos = 0
        try:
            while pos < self.size:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos
                        break
                    raise
                end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
                if end <= start:
                    break
                out.append((start, end))
                pos = end
        except (OSError, AttributeError):
            return []
        if out == [(0, self.size)] and os.fstat(self._fd).st_blocks * 512 < self.size // 2:
            return []  # the filesystem reports everything as data (no sparse support)
        return out

    def _open_committed(self) -> None:
        try:
            self._fd = os.open(self.commit_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageIOError(f"cannot open {self.commit_path}: {e.strerror}", e.errno) from e
        try:  # a crash between the commit rename and the map's removal leaves it behind
            os.unlink(self.map_path)
        except OSError:
            pass
        self.presence = PresenceMap(self.size)
        self.presence.mark(0, self.size)
        self.presence.verified = True
        self.durable = self.presence
        self.verified = True
        self._verified_event.set()

    def __repr__(self) -> str:
        state = "VERIFIED" if self.verified else "FILLING"
        return (
            f"<BlobCache {self.digest[:19]} {state} {self.presence.present_bytes}/{self.size} B"
            f" pending={self._pending_bytes}>"
        )

    # --- queries ----------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """Where the bytes are now (the commit path once a dir blob is verified)."""
        if self.verified and self.commit_path:
            return self.commit_path
        return self.data_path

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def complete(self) -> bool:
        return self.verified or self.presence.complete

    @property
    def present_bytes(self) -> int:
        return self.size if self.verified else self.presence.present_bytes

    def is_present(self, start: int, end: int) -> bool:
        return self.verified or self.presence.is_present(start, end)

    def missing_runs(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        if self.verified:
            return []
        return self.presence.missing_runs(start, self.size if end is None else end)

    def first_missing(self, start: int = 0) -> int | None:
        return None if self.verified else self.presence.first_missing(start)

    async def wait_verified(self) -> None:
        await self._verified_event.wait()

    # --- data ---------------------------------------------------------------------------------
    async def read_into(self, offset: int, buf: memoryview) -> None:
        """pread the cached bytes (the caller made sure they are present)."""
        if self._fd < 0:
            raise ImageIOError(f"{self.digest}: cache closed", errno.EBADF)
        end = offset + len(buf)
        if self._file_problem() is not None:
            await self._recover_for_read()
            if not self.is_present(offset, end):
                raise CacheLost(f"{self.data_path}: [{offset}, {end}) lost from the cache file")
        lost = self.lost
        try:
            if len(buf) > INLINE_IO_BYTES:
                n = await asyncio.get_running_loop().run_in_executor(None, self._io.pread_into, self._fd, buf, offset)
            else:
                n = self._io.pread_into(self._fd, buf, offset)
            if lost != self.lost:
                # the file was swapped or re-extended while a thread read it: the bytes may
                # come from the new file's holes
                raise CacheLost(f"{self.data_path}: [{offset}, {end}) lost from the cache file while read")
        except OSError as e:
            await self._drop_unreadable(offset, end, e.strerror)
            raise CacheLost(f"cannot read cache file {self.data_path}: {e.strerror}", e.errno) from e
        if n != len(buf):
            if self._file_problem() is not None:
                await self._recover_for_read()
            else:
                await self._drop_unreadable(offset, end, "short read")
            raise CacheLost(f"{self.data_path}: short read at {offset + n}: the cache file lost bytes")

    async def write(self, offset: int, data, *, background: bool = False) -> None:
        """Store fetched bytes at `offset`; they are readable when this returns, durable after
        the next flush. `background`: use the cache's own threads (fill/prefetch data), not
        the default executor that device reads use. Raises ImageIOError when the cache file
        cannot be written."""
        if self.verified or self._closed:
            return
        n = len(data)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"write [{offset}, {offset + n}) outside blob of {self.size}")
        gate = self.gate
        if not gate.is_open:
            err = gate.error
            raise CacheWriteError(f"cannot write cache file {self.data_path}: {err.strerror or err} (writes paused)",
                                  err.errno or errno.EIO)
        try:
            # before writing: a write past a truncation would re-extend the file over a hole
            if self._file_problem() is not None:
                await self._recover()
                if self.verified or self._closed:
                    return
            gen = self._generation
            if n > INLINE_IO_BYTES:
                ex = background_executor() if background else None
                await asyncio.get_running_loop().run_in_executor(ex, self._io.pwrite_all, self._fd, data, offset)
            else:
                self._io.pwrite_all(self._fd, data, offset)
        except OSError as e:
            gate.failed(e)
            raise CacheWriteError(f"cannot write cache file {self.data_path}: {e.strerror}", e.errno) from e
        if gate.closed:
            gate.succeeded()
        if gen != self._generation or self.verified or self._closed:
            return  # discarded while we wrote: these bytes must not be marked
        self.presence.mark(offset, offset + n)
        self._pending.append((offset, offset + n))
        self._pending_bytes += n
        self.bytes_written += n
        self._schedule_flush()
        self._kick_hash()

    # --- durability ---------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if self._pending_bytes >= self.commit_bytes:
            self._start_flush()
        elif self._timer is None and self._flush_task is None:
            self._timer = asyncio.get_running_loop().call_later(self.commit_interval, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_bg())

    async def _flush_bg(self) -> None:
        try:
            await self.flush()
        except SimulatedCrash:
            raise
        except OSError as e:  # the disk refuses: one warning from the gate, not one per flush
            self.gate.failed(e)
        except Exception:  # a failed flush only loses durability, never correctness
            log.exception("%s: flushing the cache map failed", self.data_path)
        finally:
            self._flush_task = None
            if self._pending and not self._closed:
                self._schedule_flush()

    async def flush(self) -> None:
        """Make every write so far durable: fdatasync data, then set and fsync map bits."""
        async with self._flush_lock:
            if not self._pending or self._fd < 0 or self.verified:
                return
            loop = asyncio.get_running_loop()
            pending, self._pending = self._pending, []
            self._pending_bytes = 0
            gen = self._generation
            self._hook("before_data_sync")
            try:
                await loop.run_in_executor(background_executor(), self._io.fdatasync, self._fd)
            except OSError:
                # Linux may drop the pages a failed writeback held: these bytes cannot be
                # trusted, in memory either, so they are fetched again when read
                if gen == self._generation:
                    for a, b in pending:
                        self.presence.clear(a, b)
                    if pending and min(a for a, _ in pending) < self._hash_pos:
                        self._reset_hash()
                raise
            self._hook("after_data_sync")
            if gen != self._generation:
                return
            for a, b in pending:
                self.durable.mark(a, b)
            await self._write_map()
            self._hook("after_map_write")
        self._notify("flushed")

    async def _write_map(self) -> None:
        data = self.durable.to_bytes()
        fd = self._map_fd

        def write() -> None:
            if os.fstat(fd).st_nlink == 0:  # the map was deleted under us: write a new one
                new = os.open(self.map_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    os.dup2(new, fd, inheritable=False)
                finally:
                    os.close(new)
            self._io.pwrite_all(fd, data, 0)
            self._io.fsync(fd)

        await asyncio.get_running_loop().run_in_executor(background_executor(), write)

    async def discard_all(self) -> None:
        """Forget every byte (durably, before anything is rewritten) and restart hashing."""
        self._generation += 1
        self._pending = []
        self._pending_bytes = 0
        self.presence.clear_all()
        self._reset_hash()
        async with self._flush_lock:
            self.durable.clear_all()
            if self._map_fd >= 0:
                await self._write_map()

    async def discard_range(self, start: int, end: int) -> None:
        """Forget [start, end) (e.g. a block whose CRC failed): cleared durably before refetch."""
        if self.verified:
            return
        self._generation += 1  # writes in flight may cover the range; drop them all to be safe
        self._pending = [(a, b) for a, b in self._pending if b <= start or a >= end]
        self.presence.clear(start, end)
        if start < self._hash_pos:
            self._reset_hash()
        async with self._flush_lock:
            self.durable.clear(start, end)
            await self._write_map()

    # --- verification ---------------------------------------------------------------------------
    def _reset_hash(self) -> None:
        self._hasher = hashlib.sha256()
        self._hash_pos = 0

    def _kick_hash(self) -> None:
        if self._hash_task is None or self._hash_task.done():
            if not self.verified and not self._closed:
                self._hash_task = asyncio.get_running_loop().create_task(self._hash_pump())

    def _hash_piece(self, hasher, start: int, end: int) -> None:
        buf = bytearray(min(HASH_PIECE, end - start))
        view = memoryview(buf)
        pos = start
        while pos < end:
            n = min(len(buf), end - pos)
            got = self._io.pread_into(self._fd, view[:n], pos)
            if got != n:
                raise OSError(errno.EIO, f"short read hashing {self.data_path} at {pos}")
            hasher.update(view[:n])
            pos += n

    async def _hash_pump(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.verified and not self._closed:
            gen = self._generation
            pos = self._hash_pos
            if pos >= self.size:
                await self._finish("sha256:" + self._hasher.hexdigest())
                return
            nxt = self.presence.first_missing(pos)
            end = self.size if nxt is None else nxt
            if end <= pos:
                return  # wait for more data; the next write kicks us again
            piece_end = min(end, pos + HASH_PIECE)
            hasher = self._hasher
            try:
                await loop.run_in_executor(background_executor(), self._hash_piece, hasher, pos, piece_end)
            except OSError as e:
                if self._file_problem() is not None:
                    try:
                        await self._recover()  # clears the lost ranges; their refetch kicks us again
                        continue
                    except OSError as e2:
                        e = e2
                log.error("%s: hashing failed: %s", self.data_path, e)
                return
            if gen == self._generation and hasher is self._hasher:
                self._hash_pos = piece_end

    async def _finish(self, got: str) -> None:
        if self.verify_digest and got != self.digest:
            self.mismatches += 1
            # Refetch only the ZFile blocks whose CRC fails (cache/repair.py); if that was
            # tried already and the digest still fails, or nothing can be located: everything.
            bad = None
            if not self._repair_tried:
                bad = await asyncio.get_running_loop().run_in_executor(
                    background_executor(), locate_damage, self.data_path, self.size)
            if bad:
                self._repair_tried = True
                self.repaired_bytes += sum(b - a for a, b in bad)
                log.warning("%s: sha256 mismatch (got %s); refetching the %d ZFile block range(s) whose CRC "
                            "fails: %s", self.digest, got, len(bad), bad[:8])
                for a, b in bad:
                    await self.discard_range(a, b)
            else:
                self._repair_tried = False
                log.warning("%s: sha256 mismatch (got %s); discarding and refetching", self.digest, got)
                await self.discard_all()
            self._notify("mismatch")
            return
        gen = self._generation  # a discard from here on (file lost under us) voids this verdict
        await self.flush()
        if self._file_problem() is not None:
            await self._recover()  # bumps the generation and restarts hashing
        if gen != self._generation:
            return
        if self.commit_path:
            loop = asyncio.get_running_loop()

            def commit() -> None:
                self._io.fdatasync(self._fd)
                self._hook("before_commit_rename")
                self._io.replace(self.data_path, self.commit_path)
                self._io.fsync_dir(os.path.dirname(self.commit_path) or ".")
                try:
                    os.unlink(self.map_path)
                except FileNotFoundError:
                    pass

            try:
                await loop.run_in_executor(background_executor(), commit)
            except OSError as e:
                log.error("%s: cannot commit %s: %s", self.digest, self.commit_path, e)
                return
            if self._map_fd >= 0:
                os.close(self._map_fd)
                self._map_fd = -1
        else:
            async with self._flush_lock:  # ordered with discard_range's map writes
                if gen != self._generation:
                    return
                self.durable.verified = True
                try:
                    await self._write_map()
                except OSError as e:  # only durability is lost: the next run hashes again
                    self.gate.failed(e)
        if gen != self._generation:
            return
        self.verified = True
        self.presence.verified = True
        self._verified_event.set()
        log.info("%s: verified (%d bytes)", self.digest, self.size)
        self._notify("verified")

    def _notify(self, event: str) -> None:
        for cb in list(self.listeners):
            try:
                cb(event)
            except Exception:
                log.exception("cache listener failed")

    def check_digest_error(self) -> DigestMismatch | None:
        return DigestMismatch(f"{self.digest}: sha256 mismatch") if self.mismatches else None

    # --- files changed under us -------------------------------------------------------------------
    def _file_problem(self) -> tuple[str, int] | None:
        """("deleted", 0) or ("truncated", size) when the data file no longer holds what the
        presence map says; None when it does. One fstat: cheap enough for every read."""
        if self._fd < 0 or self._closed or (self.verified and self.commit_path):
            return None  # a committed layer file is the layer's storage, not a cache to heal
        try:
            st = os.fstat(self._fd)
        except OSError:
            return None
        if st.st_nlink == 0:
            return ("deleted", 0)
        if st.st_size < self.size:
            return ("truncated", st.st_size)
        return None

    def _unverify(self) -> None:
        if self.verified:
            self.verified = False
            self.presence.verified = False
            self.durable.verified = False
            self._verified_event = asyncio.Event()

    async def _recover(self) -> None:
        """Drop what a deleted or truncated data file lost, durably, then make the file whole
        again (a fresh file at data_path, or the old one re-extended with a hole) so the lost
        ranges are fetched again. The map is cleared *before* the file regains its size: a
        crash in between leaves a size mismatch, which the next open treats as "nothing cached"."""
        async with self._recover_lock:
            problem = self._file_problem()
            if problem is None:
                return  # another reader recovered first
            what, kept = problem
            lost_from = 0 if what == "deleted" else kept - kept % PAGE_SIZE
            self.lost += 1  # first: readers in threads compare it after their pread
            self._generation += 1  # and a digest verdict in progress is void
            log.warning("%s: cache file %s %s while in use: dropping [%d, %d) and fetching it again",
                        self.digest[:19], self.data_path,
                        "deleted" if what == "deleted" else f"truncated to {kept} bytes", lost_from, self.size)
            if what == "deleted":
                new = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    os.ftruncate(new, 0)
                    # swap the inode under our fd number: a write racing in a thread lands in
                    # one file or the other (void either way: discard bumps the generation),
                    # never in an unrelated file that reused a closed fd number
                    os.dup2(new, self._fd, inheritable=False)
                finally:
                    os.close(new)
            self._unverify()
            try:
                await self.discard_range(lost_from, self.size)
            except OSError as e:
                # the durable map still promises the lost bytes: a restart must not trust it
                self.gate.failed(e)
                try:
                    os.unlink(self.map_path)
                except OSError:
                    pass
            os.ftruncate(self._fd, self.size)

    async def _recover_for_read(self) -> None:
        try:
            await self._recover()
        except OSError as e:  # cannot even make a new file: the reader goes to the registry
            raise CacheLost(f"{self.data_path}: lost under us and cannot be recreated: {e.strerror}",
                            e.errno) from e

    async def _drop_unreadable(self, start: int, end: int, why: str) -> None:
        """A pread failed (EIO, short) with the file intact: refetching rewrites those pages."""
        a, b = start - start % PAGE_SIZE, min(-(-end // PAGE_SIZE) * PAGE_SIZE, self.size)
        log.warning("%s: cannot read [%d, %d) of %s (%s): fetching it again", self.digest[:19], a, b,
                    self.data_path, why)
        self._unverify()
        try:
            await self.discard_range(a, b)
        except OSError as e:
            self.gate.failed(e)

    async def check_files(self) -> bool:
        """Look for a deleted/truncated data file now; True if one was found (and handled)."""
        if self._file_problem() is None:
            return False
        await self._recover()
        return True

    # --- close ---------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Flush pending writes durably and close the files (idempotent)."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            await self.flush()
        except OSError as e:
            log.warning("%s: final flush failed: %s", self.data_path, e)
        except Exception:
            log.exception("%s: final flush failed", self.data_path)
        self._closed = True
        for t in (self._hash_task, self._flush_task):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        self._close_fds()

    def abandon(self) -> None:
        """Close without flushing (what a crash looks like; tests)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for t in (self._hash_task, self._flush_task):
            if t is not None:
                t.cancel()
        self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_fd", "_map_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


__all__ = ["BlobCache", "CacheLost", "CacheWriteError", "SimulatedCrash", "PAGE_SIZE"]
