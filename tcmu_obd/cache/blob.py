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
* mismatch: every bit is cleared durably (we cannot tell which range was bad), listeners hear
  "mismatch" and the scheduler refetches (upstream: force_download).

States (shown in repr): FILLING → VERIFIED, or → FILLING again after a mismatch.
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
from .fileio import DEFAULT_IO, FileIO
from .presence import PAGE_SIZE, PresenceMap

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
        self._hook = fault_hook or (lambda stage: None)
        self.listeners: list[Callable[[str], None]] = []  # "flushed" / "verified" / "mismatch"
        self.mismatches = 0
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
        if len(buf) > INLINE_IO_BYTES:
            n = await asyncio.get_running_loop().run_in_executor(None, self._io.pread_into, self._fd, buf, offset)
        else:
            n = self._io.pread_into(self._fd, buf, offset)
        if n != len(buf):
            raise ImageIOError(f"{self.path}: short read at {offset + n}")

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
        gen = self._generation
        try:
            if n > INLINE_IO_BYTES:
                ex = background_executor() if background else None
                await asyncio.get_running_loop().run_in_executor(ex, self._io.pwrite_all, self._fd, data, offset)
            else:
                self._io.pwrite_all(self._fd, data, offset)
        except OSError as e:
            raise ImageIOError(f"cannot write cache file {self.data_path}: {e.strerror}", e.errno) from e
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
            await loop.run_in_executor(background_executor(), self._io.fdatasync, self._fd)
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
            except OSError:
                log.exception("%s: hashing failed", self.data_path)
                return
            if gen == self._generation and hasher is self._hasher:
                self._hash_pos = piece_end

    async def _finish(self, got: str) -> None:
        if self.verify_digest and got != self.digest:
            self.mismatches += 1
            log.warning("%s: sha256 mismatch (got %s); discarding and refetching", self.digest, got)
            await self.discard_all()
            self._notify("mismatch")
            return
        await self.flush()
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
            self.durable.verified = True
            await self._write_map()
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


__all__ = ["BlobCache", "SimulatedCrash", "PAGE_SIZE"]
