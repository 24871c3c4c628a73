"""RemoteBlobSource: a BlobSource over the cache and the scheduler.

Hits are read from the blob's cache file; misses first `await scheduler.ensure(...,
FOREGROUND)` (or the priority the calling task set in `scheduler.prefetch.READ_PRIORITY`). Once a blob with a layer `dir` is complete and verified, reads go to
`<dir>/overlaybd.commit` (a plain FileSource), as upstream's switch file does after its
background download. Registry failures surface as ImageIOError (EIO, or ETIMEDOUT for a
timeout) with the RemoteError as the cause.

Disk faults never fail a read that the registry can serve: while the cache refuses writes
(its WriteGate is closed: disk full, read-only, failing) a miss is read straight from the
registry into the caller's buffer, and bytes the cache lost under us (file deleted,
truncated, unreadable: CacheLost, ranges already cleared) are fetched again.
"""

from __future__ import annotations

import asyncio
import errno

from .cache.blob import CacheLost, CacheWriteError
from .errors import ImageIOError, RemoteError, RemoteTimeout
from .image.source import FileSource, check_range
from .scheduler import RemoteBlob, Scheduler
from .scheduler.prefetch import READ_PRIORITY

READ_ATTEMPTS = 3  # cache rounds for one read before it is served around the cache


class RemoteBlobSource:
    def __init__(self, scheduler: Scheduler, blob: RemoteBlob):
        self.scheduler = scheduler
        self.blob = blob
        self.name = blob.url
        self.digest = blob.digest
        self.size = blob.size
        self._local: FileSource | None = None
        self._closed = False
        self.direct_bytes = 0  # bytes served straight from the registry, around the cache

    @property
    def cache(self):
        return self.blob.cache

    @property
    def local_path(self) -> str | None:
        """`<dir>/overlaybd.commit` once reads have switched to it, else None."""
        return self._local.path if self._local is not None else None

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if self._closed:
            raise ImageIOError(f"{self.name}: source closed", errno.EBADF)
        check_range(self, offset, len(buf))
        end = offset + len(buf)
        if not buf:
            return
        cache = self.blob.cache
        self.blob.reads += 1  # hits = reads - misses (Scheduler.ensure counts the misses)
        self.blob.read_bytes += len(buf)
        if cache.verified and cache.commit_path:
            if self._local is None:
                self._local = FileSource(cache.commit_path, name=self.name)
            await self._local.read_into(offset, buf)
            return
        for _ in range(READ_ATTEMPTS):
            if not cache.is_present(offset, end):
                if not cache.gate.is_open:
                    await self._read_direct(offset, buf)
                    return
                try:
                    # FOREGROUND unless the calling task says otherwise (trace replay: PREFETCH)
                    await self.scheduler.ensure(self.blob, offset, len(buf), READ_PRIORITY.get())
                except CacheWriteError:
                    await self._read_direct(offset, buf)
                    return
                except RemoteTimeout as e:
                    raise ImageIOError(f"{self.name}: {e}", errno.ETIMEDOUT) from e
                except RemoteError as e:
                    raise ImageIOError(f"{self.name}: {e}", errno.EIO) from e
            self.scheduler.cache.touch(cache)
            try:
                await cache.read_into(offset, buf)
                return
            except CacheLost:
                continue  # the lost ranges are cleared: the next round fetches them again
        # the cache keeps losing these bytes (a cleaner racing us): serve them without it
        await self._read_direct(offset, buf)

    async def _read_direct(self, offset: int, buf: memoryview) -> None:
        # its own task: the NBD server runs a request's first step outside any task, and the
        # HTTP client's timeouts need one (the scheduler's transfers are tasks already)
        fetch = asyncio.get_running_loop().create_task(
            self.scheduler.fetcher.read_range_into(self.blob.url, offset, buf))
        try:
            await fetch
        except RemoteTimeout as e:
            raise ImageIOError(f"{self.name}: {e}", errno.ETIMEDOUT) from e
        except RemoteError as e:
            raise ImageIOError(f"{self.name}: {e}", errno.EIO) from e
        self.direct_bytes += len(buf)

    async def invalidate(self, offset: int, length: int) -> None:
        """The bytes read at [offset, offset+length) failed a check (a ZFile block CRC): drop
        them from the cache, durably, so the next read fetches them again. A verified blob
        passed its sha256, so its bytes are right and nothing is dropped."""
        cache = self.blob.cache
        if cache.verified or length <= 0:
            return
        page = 4096
        start = offset - offset % page
        end = min(self.size, -(-(offset + length) // page) * page)
        await cache.discard_range(start, end)
        self.scheduler.invalidated_bytes += end - start

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._local is not None:
            await self._local.aclose()
        await self.scheduler.release(self.blob)

    def __repr__(self) -> str:
        return f"<RemoteBlobSource {self.name} {self.blob.cache!r}>"
