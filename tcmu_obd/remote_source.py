"""RemoteBlobSource: a BlobSource over the cache and the scheduler.

Hits are read from the blob's cache file; misses first `await scheduler.ensure(...,
FOREGROUND)` (or the priority the calling task set in `scheduler.prefetch.READ_PRIORITY`). Once a blob with a layer `dir` is complete and verified, reads go to
`<dir>/overlaybd.commit` (a plain FileSource), as upstream's switch file does after its
background download. Registry failures surface as ImageIOError (EIO, or ETIMEDOUT for a
timeout) with the RemoteError as the cause.
"""

from __future__ import annotations

import errno

from .errors import ImageIOError, RemoteError, RemoteTimeout
from .image.source import FileSource
from .scheduler import RemoteBlob, Scheduler
from .scheduler.prefetch import READ_PRIORITY


class RemoteBlobSource:
    def __init__(self, scheduler: Scheduler, blob: RemoteBlob):
        self.scheduler = scheduler
        self.blob = blob
        self.name = blob.url
        self.digest = blob.digest
        self.size = blob.size
        self._local: FileSource | None = None
        self._closed = False

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
        end = offset + len(buf)
        if offset < 0 or end > self.size:
            raise ImageIOError(f"{self.name}: read [{offset}, {end}) past end {self.size}")
        if not buf:
            return
        cache = self.blob.cache
        if cache.verified and cache.commit_path:
            if self._local is None:
                self._local = FileSource(cache.commit_path, name=self.name)
            await self._local.read_into(offset, buf)
            return
        if not cache.is_present(offset, end):
            try:
                # FOREGROUND unless the calling task says otherwise (trace replay: PREFETCH)
                await self.scheduler.ensure(self.blob, offset, len(buf), READ_PRIORITY.get())
            except RemoteTimeout as e:
                raise ImageIOError(f"{self.name}: {e}", errno.ETIMEDOUT) from e
            except RemoteError as e:
                raise ImageIOError(f"{self.name}: {e}", errno.EIO) from e
        self.scheduler.cache.touch(cache)
        await cache.read_into(offset, buf)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._local is not None:
            await self._local.aclose()
        await self.scheduler.release(self.blob)

    def __repr__(self) -> str:
        return f"<RemoteBlobSource {self.name} {self.blob.cache!r}>"
