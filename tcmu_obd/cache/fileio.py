"""The few blocking file calls the cache makes, behind one object so tests can simulate crashes.

`FileIO` is what production uses (plain os calls). A test substitutes an object with the same
methods that remembers which writes a power cut would lose (tests/cache/crashsim.py).
`WriteGate` is how the cache lives with a disk that refuses writes (full, read-only, failing).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger(__name__)


class FileIO:
    def pwrite_all(self, fd: int, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def pread_into(self, fd: int, buf: memoryview, offset: int) -> int:
        """Fill buf from offset; returns bytes read (short only at EOF)."""
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class WriteGate:
    """Whether a cache directory takes writes; shared by every blob cached there.

    A failed cache write (ENOSPC, EDQUOT, EIO, EROFS, ...) closes the gate: until it reopens,
    BlobCache refuses writes without touching the disk and reads of missing bytes are served
    straight from the registry (RemoteBlobSource). One warning is logged when the gate closes
    and one line when it reopens, never one per read: a full disk under a busy device would
    otherwise flood the log. After `retry_after` seconds the next write is let through as a
    probe; success reopens the gate, failure closes it again for twice as long (up to
    `max_retry_after`), so a disk that stays full costs one wasted write per interval. A failure
    within `flap_window` seconds of a reopening continues the same episode (no new warning): a
    nearly full disk accepts a write into blocks already allocated and refuses the next one.
    """

    def __init__(self, where: str, *, retry_after: float = 0.5, max_retry_after: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, on_close: Callable[[], None] | None = None):
        self.where = where
        self._on_close = on_close
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self._clock = clock
        self.error: OSError | None = None
        self.failures = 0  # failed writes in the current episode
        self.episodes = 0  # times the gate closed
        self._delay = retry_after
        self._retry_at = 0.0
        self._reopened_at = float("-inf")
        self.flap_window = 10.0  # a failure this soon after reopening continues the episode

    @property
    def is_open(self) -> bool:
        return self.error is None or self._clock() >= self._retry_at

    @property
    def closed(self) -> bool:
        return self.error is not None

    def failed(self, err: OSError) -> None:
        # closed again right after a probe reopened it: a nearly full disk takes a write into
        # blocks an earlier short write had allocated, then refuses the next. Same episode: no
        # second warning, keep backing off.
        flap = self.error is None and self._clock() - self._reopened_at < self.flap_window
        if self.error is None and not flap:
            self.episodes += 1
            self.failures = 0
            self._delay = self.retry_after
            log.warning(
                "cache %s cannot be written (%s): reads of uncached data go straight to the registry "
                "until it can; retrying every %g-%g s",
                self.where, err.strerror or err, self.retry_after, self.max_retry_after,
            )
            if self._on_close is not None:
                try:
                    self._on_close()
                except Exception:
                    log.exception("cache %s: making room failed", self.where)
        else:
            self._delay = min(self._delay * 2, self.max_retry_after)
            if flap:
                log.info("cache %s still cannot be written (%s)", self.where, err.strerror or err)
        self.error = err
        self.failures += 1
        self._retry_at = self._clock() + self._delay

    def succeeded(self) -> None:
        if self.error is not None:
            self._reopened_at = self._clock()
            log.warning("cache %s is writable again after %d failed writes: caching resumed", self.where, self.failures)
            self.error = None
            self.failures = 0


DEFAULT_IO = FileIO()
