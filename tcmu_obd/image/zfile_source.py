"""ZFileSource: the decompressed bytes of a ZFile, served as a BlobSource.

Theory of operation:

* `open()` reads the 512-byte header, the trailer when the header was not overwritten, and the
  index, and builds the jump table (format/zfile.py does every check; this module only moves
  bytes). Nothing else is read up front.
* `read_into(offset, buf)` works at any alignment: it finds the blocks covering the range, takes
  the ones it has from a bounded LRU of decompressed blocks, joins fetches already in flight
  for others, and fetches the rest as runs of consecutive blocks, each run one read of the
  inner source (split at ~1 MiB so a huge read does not become one giant buffer). The batches
  of one call run concurrently (a registry-backed inner source overlaps them).
* Each batch is its own task, shared by every read that needs its blocks (equal or
  overlapping reads decode once). A reader that is cancelled stops waiting but never cancels
  the batch: the other readers still get it, and its blocks still land in the LRU.
* Decompression of a small batch stays on the event loop (a 4 KiB block is microseconds, and
  a thread hop costs more than that); a batch with more than `inline_decode_bytes` of output
  goes to a small shared thread pool, since lz4/zstd/crc32c release the GIL.
* A batch that fails its CRC or does not decompress is read again once (a transient bad read
  from a cache or network; an inner source with `invalidate(offset, length)`, the registry
  cache, first drops the bad bytes so they are fetched again); if it fails again the error is raised: ChecksumError/FormatError
  naming the blob, the block index and the block's offset in the ZFile.

Cancel invariant: the LRU and the in-flight map are only changed synchronously (when a batch
starts, and in its done-callback once it decoded completely), so a cancelled read leaves
nothing half-inserted.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from ..errors import FormatError, ImageIOError
from ..format import zfile as zf
from .source import BlobSource, check_range, read_exact

_executor: ThreadPoolExecutor | None = None


def _decode_executor() -> ThreadPoolExecutor:
    # Two threads: enough to keep decompression off the loop on the shared 2-core hosts
    # without letting one image's big read starve everything else.
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zfile-decode")
    return _executor


class ZFileSource:
    """BlobSource over the decompressed content of a ZFile held in `inner`."""

    inline_decode_bytes = 256 << 10  # decompressed bytes per batch decoded on the loop
    read_batch_bytes = zf.DEFAULT_READ_BATCH_BYTES  # stored bytes per inner read
    offload_index_blocks = 1 << 18  # build jump tables bigger than this in a thread

    def __init__(
        self,
        inner: BlobSource,
        header: zf.ZFileHeader,
        trailer: zf.ZFileHeader | None,
        jump_table: zf.JumpTable,
        *,
        cache_bytes: int = 32 << 20,
    ):
        self.inner = inner
        self.header = header
        self.trailer = trailer
        # The area carrying the index info and original size: the header when it was
        # overwritten at the end of the build, else the trailer (an old-style header has 0s).
        self.info = zf.index_info(header, trailer)
        self.jump_table = jump_table
        self.name = inner.name
        self.size = jump_table.original_size
        self.block_size = header.block_size
        self.cache_bytes = max(0, cache_bytes)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached_bytes = 0
        # block index -> (task fetching the batch holding it, position in that batch)
        self._inflight: dict[int, tuple[asyncio.Task, int]] = {}
        self._closed = False
        # Counters for inspect/metrics.
        self.cache_hits = 0
        self.cache_misses = 0
        self.stored_bytes_read = 0
        self.retries = 0

    @classmethod
    async def open(cls, inner: BlobSource, *, cache_bytes: int = 32 << 20) -> "ZFileSource":
        """Load header, trailer (if needed) and index of the ZFile in `inner`.

        Raises FormatError/ChecksumError naming `inner.name` for anything malformed.
        """
        name = inner.name
        if inner.size < zf.HEADER_SIZE:
            raise FormatError(f"{inner.size} bytes is too small for a zfile header", source=name, offset=0)
        header = zf.parse_header_trailer(await read_exact(inner, 0, zf.HEADER_SIZE), source=name, offset=0)
        zf.check_header(header, source=name)
        trailer = None
        if zf.needs_trailer(header):
            if inner.size < 2 * zf.HEADER_SIZE:
                raise FormatError(f"zfile of {inner.size} bytes has no room for a trailer",
                                  source=name, offset=inner.size)
            toff = inner.size - zf.HEADER_SIZE
            trailer = zf.parse_header_trailer(await read_exact(inner, toff, zf.HEADER_SIZE),
                                              source=name, offset=toff)
        start, n = zf.index_location(header, trailer, inner.size, source=name)
        info = zf.index_info(header, trailer)
        index = await read_exact(inner, start, 4 * n)
        if n > cls.offload_index_blocks:
            jt = await asyncio.get_running_loop().run_in_executor(
                _decode_executor(),
                lambda: zf.JumpTable.from_index(index, header, info, source=name, index_offset=start),
            )
        else:
            jt = zf.JumpTable.from_index(index, header, info, source=name, index_offset=start)
        return cls(inner, header, trailer, jt, cache_bytes=cache_bytes)

    # -- cache ---------------------------------------------------------------------------

    def _cache_get(self, i: int) -> bytes | None:
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
        return data

    def _cache_put(self, i: int, data: bytes) -> None:
        if self.cache_bytes < len(data):
            return
        old = self._cache.pop(i, None)
        if old is not None:
            self._cached_bytes -= len(old)
        self._cache[i] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= len(evicted)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    # -- reads ---------------------------------------------------------------------------

    def _decode_batch(self, batch: zf.ReadBatch, stored: bytes | bytearray) -> list[bytes]:
        jt, h = self.jump_table, self.header
        mv = memoryview(stored)
        out = []
        for i in batch.blocks:
            off, ln = jt.block_range(i)
            rel = off - batch.offset
            out.append(zf.decode_block(
                mv[rel:rel + ln], algo=h.algo, verify=h.verify, block_size=h.block_size,
                expected_len=jt.raw_len(i), source=self.name, offset=off, index=i,
            ))
        return out

    async def _fetch_batch(self, batch: zf.ReadBatch) -> list[bytes]:
        raw_bytes = len(batch.blocks) * self.block_size
        for attempt in (0, 1):
            stored = bytearray(batch.length)
            await self.inner.read_into(batch.offset, memoryview(stored))
            self.stored_bytes_read += batch.length
            try:
                if raw_bytes > self.inline_decode_bytes:
                    return await asyncio.get_running_loop().run_in_executor(
                        _decode_executor(), self._decode_batch, batch, stored)
                return self._decode_batch(batch, stored)
            except FormatError:
                if attempt:
                    raise
                self.retries += 1  # one fresh read before giving up: the bytes may have been torn
                # a caching inner source (registry blob) would hand back the same wrong bytes:
                # have it drop them so the fresh read really goes back to the registry
                invalidate = getattr(self.inner, "invalidate", None)
                if invalidate is not None:
                    await invalidate(batch.offset, batch.length)
        raise AssertionError("unreachable")

    def _plan(self, missing: list[int]) -> list[zf.ReadBatch]:
        """Runs of consecutive missing blocks, each split into reads of read_batch_bytes."""
        batches: list[zf.ReadBatch] = []
        if not missing:
            return batches
        run_start = prev = missing[0]
        for i in missing[1:]:
            if i == prev + 1:
                prev = i
                continue
            batches.extend(self.jump_table.plan_reads(range(run_start, prev + 1), self.read_batch_bytes))
            run_start = prev = i
        batches.extend(self.jump_table.plan_reads(range(run_start, prev + 1), self.read_batch_bytes))
        return batches

    def _batch_done(self, batch: zf.ReadBatch, task: asyncio.Task) -> None:
        for i in batch.blocks:
            entry = self._inflight.get(i)
            if entry is not None and entry[0] is task:
                del self._inflight[i]
        if task.cancelled():
            return
        if task.exception() is not None:  # also marks it retrieved when no reader is left
            return
        for i, data in zip(batch.blocks, task.result()):
            self._cache_put(i, data)

    def _check_read(self, offset: int, length: int) -> None:
        check_range(self, offset, length)
        if self._closed:
            raise ImageIOError(f"{self.name}: read after close")

    def _copy_blocks(self, offset: int, buf: memoryview, blocks, decoded) -> None:
        """Copy the parts of decoded blocks (`decoded[i]`: block i's bytes) that [offset,
        offset + len(buf)) covers into buf."""
        bs, end = self.block_size, offset + len(buf)
        for i in blocks:
            bstart = i * bs
            lo = max(offset, bstart)
            hi = min(end, bstart + bs)
            buf[lo - offset:hi - offset] = memoryview(decoded[i])[lo - bstart:hi - bstart]

    def read_into_nowait(self, offset: int, buf: memoryview) -> bool:
        """Fill buf from the LRU and return True when every block it needs is decoded there
        (its CRC was checked when it was decoded); else return False having changed nothing,
        so read_into fetches. No task, no lists: the cached 4 KiB read of the frontends."""
        length = len(buf)
        self._check_read(offset, length)
        if length == 0:
            return True
        bs = self.block_size
        first = offset // bs
        last = (offset + length - 1) // bs
        cache = self._cache
        if first == last:
            data = cache.get(first)
            if data is None:
                return False
            cache.move_to_end(first)
            self.cache_hits += 1
            skip = offset - first * bs
            if skip == 0 and length == len(data):
                buf[:] = data
            else:
                buf[:] = memoryview(data)[skip:skip + length]
            return True
        for i in range(first, last + 1):
            if i not in cache:
                return False
        for i in range(first, last + 1):
            cache.move_to_end(i)
        self._copy_blocks(offset, buf, range(first, last + 1), cache)
        self.cache_hits += last - first + 1
        return True

    async def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        self._check_read(offset, length)
        if length == 0:
            return
        blocks = self.jump_table.blocks_for(offset, length)
        have: dict[int, bytes] = {}
        pending: dict[int, tuple[asyncio.Task, int]] = {}
        missing: list[int] = []
        for i in blocks:
            data = self._cache_get(i)
            if data is not None:
                have[i] = data
            elif i in self._inflight:
                pending[i] = self._inflight[i]
            else:
                missing.append(i)
        self.cache_hits += len(have)
        self.cache_misses += len(missing)
        for batch in self._plan(missing):
            task = asyncio.ensure_future(self._fetch_batch(batch))
            task.add_done_callback(functools.partial(self._batch_done, batch))
            for k, i in enumerate(batch.blocks):
                self._inflight[i] = pending[i] = (task, k)
        if pending:
            # asyncio.wait never cancels what it waits for: a cancelled reader leaves the
            # batches running for the other readers and the cache.
            await asyncio.wait({t for t, _ in pending.values()})
            for i, (task, k) in pending.items():
                if task.cancelled():  # only aclose() cancels batches
                    raise ImageIOError(f"{self.name}: read aborted: source closed")
                have[i] = task.result()[k]  # raises the batch's error
        self._copy_blocks(offset, buf, blocks, have)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = {t for t, _ in self._inflight.values()}
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._inflight.clear()
        self._cache.clear()
        self._cached_bytes = 0
        await self.inner.aclose()

    def __repr__(self) -> str:
        return (f"ZFileSource({self.name!r}, size={self.size}, blocks={self.jump_table.n_blocks}, "
                f"algo={self.header.algorithm_name}, bs={self.block_size}, cached={self._cached_bytes})")
