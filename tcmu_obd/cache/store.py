"""CacheStore: the cache directory — which blobs exist, how much space they use, LRU eviction.

Layout (cacheType "file", as upstream's file cache names it):

    <cacheDir>/sha256:<hex>        sparse data file, blob offsets
    <cacheDir>/sha256:<hex>.map    durable presence map (see presence.py)

A lower with `dir` keeps its bytes with the layer instead, as upstream's background download
does: `<dir>/.download` (+ `<dir>/.download.map`) until verified, then `<dir>/overlaybd.commit`.
Those do not count against `cacheSizeGB` and are never evicted (they are the layer's storage).

Eviction (upstream's numbers, docs/overlaybd-format.md §5.3): with capacity C,
waterMark = max(0.9·C, C − 50 GiB), riskMark = max(C − 5 GiB, (waterMark + C)/2). When usage
reaches riskMark (checked after every flush), or exceeds waterMark at a periodic check (10 s),
whole blobs are removed least-recently-used first until usage ≤ waterMark. A blob that is
open (in use by an image or the filler) is never evicted. Capacity 0 means unbounded.

A disk that refuses writes (full below cacheSizeGB, read-only, failing) closes the store's
WriteGate, shared by every blob in the cache dir: reads bypass the cache until a probe write
succeeds (fileio.py). When the gate closes, unused blobs (LRU first) are evicted until a tenth
of the cache's usage is given back, so a cache that shares a full disk makes room first.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from ..config import is_digest
from ..errors import ConfigError, ImageIOError
from .blob import BlobCache
from .fileio import DEFAULT_IO, FileIO, WriteGate
from .presence import HEADER, HEADER_SIZE, MAGIC

log = logging.getLogger(__name__)

GiB = 1 << 30
EVICT_PERIOD_S = 10.0


def water_marks(capacity: int) -> tuple[int, int]:
    """(waterMark, riskMark) in bytes for a capacity in bytes, as upstream computes them."""
    water = max(capacity * 9 // 10, capacity - 50 * GiB)
    risk = max(capacity - 5 * GiB, (water + capacity) // 2)
    return water, risk


@dataclass
class _Entry:
    key: str  # file name in the cache dir ("sha256:<hex>")
    used_bytes: int  # bytes present (from the map) or allocated (no map)
    last_used: float
    blob: BlobCache | None = None
    refs: int = 0


class CacheStore:
    def __init__(
        self,
        cache_dir: str,
        capacity_bytes: int,
        refill_size: int = 262144,
        *,
        commit_bytes: int = 64 << 20,
        commit_interval: float = 0.1,
        io: FileIO = DEFAULT_IO,
        clock: Callable[[], float] = time.monotonic,
        fault_hook: Callable[[str], None] | None = None,
    ):
        self.cache_dir = cache_dir
        self.capacity = capacity_bytes
        self.refill_size = refill_size
        self.commit_bytes = commit_bytes
        self.commit_interval = commit_interval
        self._io = io
        self._clock = clock
        self._fault_hook = fault_hook
        self.gate = WriteGate(cache_dir, on_close=self._on_disk_full)
        self._entries: dict[str, _Entry] = {}
        self._dir_blobs: dict[str, tuple[BlobCache, list[int]]] = {}  # dir → (blob, [refs])
        self._last_evict = clock()
        self.evicted: list[str] = []  # keys, for tests and logs
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise ImageIOError(f"cannot create cache dir {cache_dir}: {e.strerror}", e.errno) from e
        self._adopt()

    @classmethod
    def from_config(cls, global_config, **kw) -> "CacheStore":
        c = global_config.effective_cache
        return cls(c.cache_dir, c.cache_size_gb * GiB, c.refill_size, **kw)

    # --- accounting ---------------------------------------------------------------------------
    def _adopt(self) -> None:
        """Account for blobs a previous run left, oldest-used first (mtime of the map/data)."""
        now_wall = time.time()
        for name in os.listdir(self.cache_dir):
            if not name.startswith("sha256:") or name.endswith(".map") or name.endswith(".tmp"):
                continue
            path = os.path.join(self.cache_dir, name)
            used = 0
            mtime = 0.0
            try:
                st = os.stat(path)
                mtime = st.st_mtime
                with open(path + ".map", "rb") as f:
                    hdr = f.read(HEADER_SIZE)
                    magic, page, _flags, size, _ = HEADER.unpack(hdr)
                    if magic == MAGIC:
                        bits = f.read()
                        used = min(size, int.from_bytes(bits, "little").bit_count() * page)
                    mtime = max(mtime, os.fstat(f.fileno()).st_mtime)
            except (OSError, ValueError, Exception):
                try:
                    used = os.stat(path).st_blocks * 512
                except OSError:
                    continue
            # map wall-clock age onto our clock so older files sort first
            self._entries[name] = _Entry(name, used, self._clock() - max(0.0, now_wall - mtime))

    def _blob_used(self, e: _Entry) -> int:
        return e.blob.present_bytes if e.blob is not None else e.used_bytes

    @property
    def usage_bytes(self) -> int:
        return sum(self._blob_used(e) for e in self._entries.values())

    @property
    def marks(self) -> tuple[int, int]:
        return water_marks(self.capacity)

    # --- open/close ---------------------------------------------------------------------------
    def open_blob(self, digest: str, size: int, *, dir: str = "", verify: bool = True) -> BlobCache:
        """The BlobCache for `digest` (shared, reference counted; release() when done).

        With `dir`, the blob lives in `<dir>/.download` → `<dir>/overlaybd.commit`.
        Raises ConfigError for a digest that is not `sha256:` + 64 lowercase hex: it becomes
        a file name here, so "../x" or "a/b" must never reach os.path.join.
        """
        if not is_digest(digest):
            raise ConfigError(f"blob digest {digest!r} is not sha256:<64 lowercase hex digits>")
        kw = dict(
            commit_bytes=self.commit_bytes,
            commit_interval=self.commit_interval,
            io=self._io,
            fault_hook=self._fault_hook,
            verify_digest=verify,
        )
        if dir:
            key = os.path.abspath(dir)
            if key in self._dir_blobs:
                blob, refs = self._dir_blobs[key]
                refs[0] += 1
                return blob
            blob = BlobCache(
                digest=digest,
                size=size,
                data_path=os.path.join(dir, ".download"),
                map_path=os.path.join(dir, ".download.map"),
                commit_path=os.path.join(dir, "overlaybd.commit"),
                **kw,
            )
            self._dir_blobs[key] = (blob, [1])
            return blob
        key = digest
        e = self._entries.get(key)
        if e is not None and e.blob is not None:
            if e.blob.size != size:
                raise ImageIOError(f"{digest}: opened with size {size}, cache has {e.blob.size}")
            e.refs += 1
            e.last_used = self._clock()
            return e.blob
        path = os.path.join(self.cache_dir, key)
        blob = BlobCache(digest=digest, size=size, data_path=path, map_path=path + ".map", gate=self.gate, **kw)
        if e is None:
            e = _Entry(key, 0, self._clock())
            self._entries[key] = e
        e.blob, e.refs, e.last_used = blob, 1, self._clock()
        blob.listeners.append(lambda event: self.maybe_evict())
        self.maybe_evict()
        return blob

    async def release(self, blob: BlobCache) -> None:
        """Drop one reference; the last one flushes and closes the blob's files."""
        for key, (b, refs) in list(self._dir_blobs.items()):
            if b is blob:
                refs[0] -= 1
                if refs[0] <= 0:
                    del self._dir_blobs[key]
                    await blob.aclose()
                return
        for e in self._entries.values():
            if e.blob is blob:
                e.refs -= 1
                e.last_used = self._clock()
                if e.refs <= 0:
                    e.used_bytes = blob.present_bytes
                    e.blob = None
                    e.refs = 0
                    await blob.aclose()
                    try:
                        os.utime(blob.map_path)
                    except OSError:
                        pass
                    self.maybe_evict()
                return

    def touch(self, blob: BlobCache) -> None:
        """Note a read of `blob` for LRU order."""
        e = self._entries.get(blob.digest)
        if e is not None and e.blob is blob:
            e.last_used = self._clock()

    # --- eviction -----------------------------------------------------------------------------
    def maybe_evict(self) -> list[str]:
        """Evict when usage ≥ riskMark, or > waterMark and the periodic check is due."""
        if self.capacity <= 0:
            return []
        used = self.usage_bytes
        water, risk = self.marks
        now = self._clock()
        if used >= risk or (used > water and now - self._last_evict >= EVICT_PERIOD_S):
            self._last_evict = now
            return self.evict_to(water)
        return []

    def _on_disk_full(self) -> None:
        """The gate just closed: give back what unused blobs hold (LRU) before bypassing."""
        used = self.usage_bytes
        unused = sum(e.used_bytes for e in self._entries.values() if e.blob is None and e.refs <= 0)
        if unused:
            self.evict_to(max(used * 9 // 10, used - unused))

    def evict_to(self, target: int) -> list[str]:
        """Remove unused blobs, least recently used first, until usage ≤ target."""
        used = self.usage_bytes
        out = []
        for e in sorted(self._entries.values(), key=lambda e: e.last_used):
            if used <= target:
                break
            if e.blob is not None or e.refs > 0:
                continue
            path = os.path.join(self.cache_dir, e.key)
            for p in (path, path + ".map"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    log.warning("cannot evict %s: %s", p, err)
            used -= e.used_bytes
            del self._entries[e.key]
            out.append(e.key)
            log.info("evicted %s (%d bytes) from the cache", e.key, e.used_bytes)
        if used > target:
            log.warning("cache usage %d above waterMark %d: the rest is in use", used, target)
        self.evicted += out
        return out

    async def aclose(self) -> None:
        for e in list(self._entries.values()):
            if e.blob is not None:
                e.refs = 1
                await self.release(e.blob)
        for _key, (b, refs) in list(self._dir_blobs.items()):
            refs[0] = 1
            await self.release(b)
