"""The merged image: read-only lowers stacked under an optional writable upper.

Theory of operation
-------------------
Lowers are committed LSMT layers (config order: bottom → top). Their indexes are merged
once at open into one SegmentMap whose mapping tags name the layer that wins each run: the
top-most layer with *any* mapping (data or zeroed) covering a sector wins, zeroed hides
what lies below, and sectors no layer maps are holes (upstream's merge_indexes rule).

The writable upper keeps its own SegmentMap, updated on every write; a read looks there
first and falls through to the merged lowers for the gaps. LSMT addresses 512-byte
sectors, the frontends address bytes: reads at any alignment are widened to sectors and
copied out; unaligned writes read-modify-write their edge sectors under a lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ..config import (
    GlobalConfig,
    ImageConfig,
    load_global_config,
    load_image_config,
    local_layer_candidates,
    write_result_file,
)
from ..errors import ConfigError, FormatError, ImageIOError, ObdError, ReadOnlyError
from ..format import lsmt
from .base import Extent
from .layers import CommittedLayer, open_committed_layer
from .source import BlobSource, FileSource, nowait_reader

log = logging.getLogger(__name__)

SECTOR = lsmt.SECTOR
_SECTOR_SHIFT = SECTOR.bit_length() - 1
_SECTOR_MASK = SECTOR - 1
_ZEROS = memoryview(bytes(128 << 10))  # source of zero fill for holes, no allocation per read


def _zero(buf: memoryview, length: int) -> None:
    if length <= len(_ZEROS):
        buf[:] = _ZEROS[:length]
    else:
        buf[:] = bytes(length)


class Image:
    """A BlockImage over stacked layers (usually built by `open_image`)."""

    block_size = SECTOR

    def __init__(self, lowers: list[CommittedLayer], upper: Any = None, *, read_only: bool = False,
                 config: ImageConfig | None = None):
        self.lowers = lowers
        self.upper = upper  # a WritableLayer or None
        self.config = config
        self.merged = lsmt.merge_stack([layer.mappings for layer in lowers])
        lower_vsize = 0
        for layer in reversed(lowers):
            if layer.virtual_size > 0:
                lower_vsize = layer.virtual_size
                break
        if upper is not None:
            if upper.virtual_size == 0 and lower_vsize and not read_only:
                upper.set_virtual_size(lower_vsize)
            self.size = upper.virtual_size or lower_vsize
        else:
            self.size = lower_vsize
        if self.size <= 0:
            raise FormatError("no layer of the image has a virtual size", source=config.source if config else None)
        if self.size % SECTOR:
            raise FormatError(f"virtual size {self.size} is not a multiple of 512",
                              source=config.source if config else None)
        self.read_only = read_only or upper is None
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._background: set[asyncio.Task] = set()  # trace replay / record watcher
        self._recorder = None
        self.trace_replay: asyncio.Task | None = None  # done when a replayed trace is prefetched
        # Per lower: (layer, the source seen, its read_into_nowait or None). Bound once so a
        # cached read pays no getattr; re-bound when a layer's source is swapped (trace record).
        self._lower_nowait = [self._bind_nowait(layer) for layer in lowers]

    @property
    def blob_sources(self) -> list[BlobSource]:
        """The stored blob of each lower (before tar/ZFile unwrapping), bottom first."""
        return [layer.unwrapped.outer for layer in self.lowers]

    # ------------------------------------------------------------------ reads

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageIOError(f"range [{offset}, {offset + length}) outside disk of {self.size} bytes", 22)

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return bytes(buf)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if self.read_into_nowait(offset, buf):
            return
        length = len(buf)
        self._check_range(offset, length)
        first = offset // SECTOR
        end = -(-(offset + length) // SECTOR)
        if first * SECTOR == offset and end * SECTOR == offset + length:
            await self._read_sectors(first, end - first, buf)
            return
        tmp = bytearray((end - first) * SECTOR)
        await self._read_sectors(first, end - first, memoryview(tmp))
        skip = offset - first * SECTOR
        buf[:] = tmp[skip : skip + length]

    # Synchronous fast path. A read whose bytes are all at hand (holes, zeroed runs, the
    # upper's data file, local lowers, decoded ZFile blocks) is answered here without a
    # coroutine, a task or a list; the frontends try it before read_into, which tries it too.
    # It must give the same bytes and errors as the async path, so it only declines (returns
    # False, having waited for nothing) where the async path would wait: a lower whose source
    # has no read_into_nowait (remote blobs, trace recording) or whose source says it lacks
    # the bytes. buf may hold partial data after a decline; the async path rewrites all of it.

    @staticmethod
    def _bind_nowait(layer: CommittedLayer) -> tuple:
        src = layer.source
        return layer, src, nowait_reader(src)

    def read_into_nowait(self, offset: int, buf: memoryview) -> bool:
        """Fill buf with the disk's bytes at offset and return True if that needs no waiting;
        else return False (call read_into). Raises ImageIOError like read_into."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            self._check_range(offset, length)
        if offset & _SECTOR_MASK or length & _SECTOR_MASK:
            if length == 0:
                return True
            first = offset // SECTOR
            end = -(-(offset + length) // SECTOR)
            tmp = bytearray((end - first) * SECTOR)
            if not self._pieces_nowait(first, end - first, memoryview(tmp)):
                return False
            skip = offset - first * SECTOR
            buf[:] = tmp[skip:skip + length]
            return True
        if length == 0:
            return True
        sector = offset >> _SECTOR_SHIFT
        count = length >> _SECTOR_SHIFT
        upper = self.upper
        if upper is not None:
            m = upper.segment_map.covering(sector, count)
            if m is False:
                return self._pieces_nowait(sector, count, buf)
            if m is not None:
                if m.zeroed:
                    _zero(buf, length)
                else:
                    buf[:] = upper.read_data(m.moffset + (sector - m.offset), count)
                return True
        m = self.merged.covering(sector, count)
        if m is None or (m is not False and m.zeroed):
            _zero(buf, length)
            return True
        if m is False:
            return self._lower_pieces_nowait(sector, count, buf)
        return self._lower_nowait_at(m.tag, (m.moffset + (sector - m.offset)) << _SECTOR_SHIFT, buf)

    def _lower_nowait_at(self, tag: int, offset: int, dst: memoryview) -> bool:
        bound = self._lower_nowait[tag]
        layer, src, nowait = bound
        if layer.source is not src:
            bound = self._lower_nowait[tag] = self._bind_nowait(layer)
            nowait = bound[2]
        if nowait is None:
            return False
        try:
            return nowait(offset, dst)
        except ObdError:
            raise
        except OSError as e:  # as _read_layer words it
            raise ImageIOError(f"{layer.name}: read at {offset}: {e}", e.errno or 5) from e

    def _pieces_nowait(self, sector: int, count: int, out: memoryview) -> bool:
        """_read_sectors without waiting: every piece, upper first, or False at the first
        lower piece that would wait."""
        if self.upper is None:
            return self._lower_pieces_nowait(sector, count, out)
        for p_off, p_len, m in self.upper.segment_map.lookup(sector, count):
            dst = out[(p_off - sector) * SECTOR : (p_off - sector + p_len) * SECTOR]
            if m is None:
                if not self._lower_pieces_nowait(p_off, p_len, dst):
                    return False
            elif m.zeroed:
                dst[:] = bytes(len(dst))
            else:
                dst[:] = self.upper.read_data(m.moffset, m.length)
        return True

    def _lower_pieces_nowait(self, sector: int, count: int, out: memoryview) -> bool:
        for p_off, p_len, m in self.merged.lookup(sector, count):
            dst = out[(p_off - sector) * SECTOR : (p_off - sector + p_len) * SECTOR]
            if m is None or m.zeroed:
                dst[:] = bytes(len(dst))
            elif not self._lower_nowait_at(m.tag, m.moffset * SECTOR, dst):
                return False
        return True

    async def _read_sectors(self, sector: int, count: int, out: memoryview) -> None:
        jobs = []
        if self.upper is not None:
            for p_off, p_len, m in self.upper.segment_map.lookup(sector, count):
                dst = out[(p_off - sector) * SECTOR : (p_off - sector + p_len) * SECTOR]
                if m is None:
                    self._plan_lower(p_off, p_len, dst, jobs)
                elif m.zeroed:
                    dst[:] = bytes(len(dst))
                else:
                    dst[:] = self.upper.read_data(m.moffset, m.length)
        else:
            self._plan_lower(sector, count, out, jobs)
        if len(jobs) == 1:
            await jobs[0]
        elif jobs:
            results = await asyncio.gather(*jobs, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r

    def _plan_lower(self, sector: int, count: int, out: memoryview, jobs: list) -> None:
        for p_off, p_len, m in self.merged.lookup(sector, count):
            dst = out[(p_off - sector) * SECTOR : (p_off - sector + p_len) * SECTOR]
            if m is None or m.zeroed:
                dst[:] = bytes(len(dst))
            else:
                jobs.append(self._read_layer(self.lowers[m.tag], m.moffset * SECTOR, dst))

    async def _read_layer(self, layer: CommittedLayer, offset: int, dst: memoryview) -> None:
        try:
            await layer.source.read_into(offset, dst)
        except ObdError:
            raise
        except OSError as e:
            raise ImageIOError(f"{layer.name}: read at {offset}: {e}", e.errno or 5) from e

    # ------------------------------------------------------------------ allocation map

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        if length == 0:
            return []
        first = offset // SECTOR
        end = -(-(offset + length) // SECTOR)
        runs: list[tuple[int, int, str]] = []

        def lower_runs(s: int, n: int) -> None:
            for p_off, p_len, m in self.merged.lookup(s, n):
                runs.append((p_off, p_len, "hole" if m is None else ("zero" if m.zeroed else "data")))

        if self.upper is not None:
            for p_off, p_len, m in self.upper.segment_map.lookup(first, end - first):
                if m is None:
                    lower_runs(p_off, p_len)
                else:
                    runs.append((p_off, p_len, "zero" if m.zeroed else "data"))
        else:
            lower_runs(first, end - first)
        out: list[Extent] = []
        for s, n, kind in runs:
            start = max(s * SECTOR, offset)
            stop = min((s + n) * SECTOR, offset + length)
            if out and out[-1].kind == kind and out[-1].offset + out[-1].length == start:
                prev = out.pop()
                out.append(Extent(prev.offset, stop - prev.offset, kind))
            else:
                out.append(Extent(start, stop - start, kind))
        return out

    # ------------------------------------------------------------------ writes

    def _writable(self):
        if self.read_only or self.upper is None:
            raise ReadOnlyError("image has no writable upper layer" if self.upper is None else "image opened read-only")
        return self.upper

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        upper = self._writable()
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        if not data:
            return
        async with self._write_lock:
            first = offset // SECTOR
            end = -(-(offset + len(data)) // SECTOR)
            if first * SECTOR != offset or end * SECTOR != offset + len(data):
                # Edge sectors are read back so the untouched bytes survive the write.
                tmp = bytearray((end - first) * SECTOR)
                await self._read_sectors(first, end - first, memoryview(tmp))
                skip = offset - first * SECTOR
                tmp[skip : skip + len(data)] = data
                data, offset = memoryview(tmp), first * SECTOR
            try:
                upper.pwrite(offset, data)
            except OSError as e:
                raise ImageIOError(f"write to upper layer at {offset}: {e.strerror}", e.errno or 5) from e

    async def discard(self, offset: int, length: int) -> None:
        upper = self._writable()
        self._check_range(offset, length)
        first = -(-offset // SECTOR)
        end = (offset + length) // SECTOR
        # Partial sectors at either edge are zero-written; whole sectors become zeroed mappings.
        if end <= first:
            if length:
                await self.write(offset, bytes(length))
            return
        if first * SECTOR > offset:
            await self.write(offset, bytes(first * SECTOR - offset))
        if (offset + length) > end * SECTOR:
            await self.write(end * SECTOR, bytes(offset + length - end * SECTOR))
        async with self._write_lock:
            try:
                upper.discard(first * SECTOR, (end - first) * SECTOR)
            except OSError as e:
                raise ImageIOError(f"discard on upper layer at {offset}: {e.strerror}", e.errno or 5) from e

    async def flush(self) -> None:
        if self.upper is None or self.read_only:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.upper.fsync)
        except OSError as e:
            raise ImageIOError(f"flush of upper layer: {e.strerror}", e.errno or 5) from e

    # ------------------------------------------------------------------ trace prefetch

    def start_trace(self, cfg: ImageConfig, global_config: GlobalConfig, scheduler) -> str | None:
        """Upstream's trace modes (§7): record every lower read into an empty recordTracePath
        (until `<trace>.lock` is deleted or the image closes), or replay a recorded trace at
        prefetch priority. Returns "record", "replay" or None."""
        from ..scheduler.prefetch import RecordingSource, TraceRecorder, load_trace, replay_trace, trace_mode

        mode, path = trace_mode(cfg)
        if mode == "record":
            self._recorder = TraceRecorder(path)
            for i, layer in enumerate(self.lowers):
                layer.source = RecordingSource(layer.source, i, self._recorder)
            self._spawn(self._watch_trace_lock())
        elif mode == "replay" and scheduler is not None:
            records = load_trace(path)
            if records:
                sources = [layer.source for layer in self.lowers]
                self.trace_replay = self._spawn(
                    replay_trace(records, sources, global_config.prefetch_config.concurrency))
        return mode

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _watch_trace_lock(self) -> None:
        # Upstream's protocol: whoever asked for the trace deletes <trace>.lock to end it.
        while not self._recorder.lock_removed:
            await asyncio.sleep(1.0)
        await asyncio.get_running_loop().run_in_executor(None, self._recorder.stop)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._recorder is not None:
            self._recorder.stop()
        try:
            if self.upper is not None:
                if not self.read_only:
                    await self.flush()
                self.upper.close()
        finally:
            for layer in self.lowers:
                try:
                    await layer.aclose()
                except Exception:  # closing must go on for the other layers
                    log.exception("closing layer %s", layer.name)

    async def __aenter__(self) -> "Image":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


# ---------------------------------------------------------------------- opening from a config


async def _open_lower(index: int, lower, cfg: ImageConfig, scheduler) -> CommittedLayer:
    if lower.target_file or lower.target_digest or lower.gzip_index:
        # A TurboOCI meta layer maps into the original OCI tar through tag 1; read as a plain
        # layer it would return wrong data silently, so refuse it by name.
        raise ConfigError(
            f"failed to open layer {index}: TurboOCI layers (targetFile/targetDigest/gzipIndex) are not supported"
        )
    for path in local_layer_candidates(lower):
        if os.path.exists(path):
            try:
                blob: BlobSource = FileSource(path)
            except ImageIOError as e:
                raise ImageIOError(f"failed to open local file {path}: {e}", e.errno) from e
            break
    else:
        if not lower.digest:
            raise ConfigError(
                f"failed to open layer {index}: no local file among "
                f"{local_layer_candidates(lower)} and no digest to fetch"
            )
        if not cfg.repo_blob_url:
            raise ConfigError(f"failed to open layer {index}: empty repoBlobUrl")
        if scheduler is None:
            raise ConfigError(f"failed to open layer {index}: remote layer {lower.digest} but no scheduler")
        blob = await scheduler.open_blob(cfg, lower)
    try:
        return await open_committed_layer(blob)
    except BaseException:
        await blob.aclose()
        raise


async def open_image(
    config_path: str | os.PathLike,
    global_config: GlobalConfig | None = None,
    *,
    scheduler=None,
    read_only: bool = False,
    background_fill: bool = True,
) -> Image:
    """Open the image a config.v1.json describes; writes its resultFile like upstream.

    With a scheduler and `background_fill`, upstream's background download starts once the
    image is open: when download.enable is set, every remote lower with a `dir` is filled
    (after download.delay) and ends as <dir>/overlaybd.commit.

    Raises ObdError subclasses naming the layer and the cause.
    """
    if global_config is None:
        global_config = load_global_config(None)
    cfg = load_image_config(config_path, global_config)
    try:
        image = await _open_image(cfg, global_config, scheduler, read_only)
    except ObdError as e:
        write_result_file(cfg, e)
        raise
    except OSError as e:
        write_result_file(cfg, e)
        raise ImageIOError(f"{config_path}: {e}", e.errno or 5) from e
    write_result_file(cfg, None)
    trace = image.start_trace(cfg, global_config, scheduler) if background_fill else None
    if scheduler is not None and background_fill and trace != "record":  # upstream: no fill while recording
        scheduler.start_image_fill(cfg, image.blob_sources)
    return image


async def _open_image(cfg: ImageConfig, global_config: GlobalConfig, scheduler, read_only: bool) -> Image:
    lowers_cfg = list(cfg.lowers)
    if cfg.acceleration_layer and lowers_cfg:
        lowers_cfg = lowers_cfg[:-1]  # the last lower holds the trace, not image data
    if not lowers_cfg and not cfg.upper.enabled:
        raise ConfigError(f"{cfg.source}: no lowers and no upper: nothing to serve")
    results = await asyncio.gather(
        *(_open_lower(i, lower, cfg, scheduler) for i, lower in enumerate(lowers_cfg)), return_exceptions=True
    )
    lowers = [r for r in results if isinstance(r, CommittedLayer)]
    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failures:
        for layer in lowers:
            await layer.aclose()
        i, err = failures[0]
        if isinstance(err, (ObdError, OSError)):
            raise _name_layer(err, i) from err
        raise err
    upper = None
    if cfg.upper.target or cfg.upper.gzip_index:
        raise ConfigError(f"{cfg.source}: TurboOCI writable layers (upper.target/gzipIndex) are not supported")
    if cfg.upper.enabled:
        from .writable import WritableLayer

        try:
            upper = WritableLayer.open(cfg.upper.data, cfg.upper.index, read_only=read_only)
        except BaseException:
            for layer in lowers:
                await layer.aclose()
            raise
    try:
        return Image(lowers, upper, read_only=read_only, config=cfg)
    except BaseException:
        if upper is not None:
            upper.close()
        for layer in lowers:
            await layer.aclose()
        raise


def _name_layer(err: BaseException, index: int) -> BaseException:
    """The same error, its message saying which layer failed (as upstream's resultFile does)."""
    prefix = f"failed to open layer {index}"
    if str(err).startswith(prefix):
        return err
    if isinstance(err, FormatError):
        return type(err)(f"{prefix}: {err.message}", source=err.source, offset=err.offset)
    if isinstance(err, ImageIOError):
        return type(err)(f"{prefix}: {err}", err.errno) if type(err) is ImageIOError else err
    if isinstance(err, OSError):
        return ImageIOError(f"{prefix}: {err}", err.errno or 5)
    try:
        return type(err)(f"{prefix}: {err}")
    except TypeError:
        return ObdError(f"{prefix}: {err}")
