"""Trace prefetch (docs/overlaybd-format.md §7): replay a recorded trace at PREFETCH priority,
and record one.

Priority travels with the task, not through every signature: `READ_PRIORITY` is a context
variable that RemoteBlobSource reads (default FOREGROUND). Replay workers set it to PREFETCH,
so a replayed read that misses goes to the scheduler as PREFETCH — admitted through the
background window ahead of FILL, promoted at once if a device read needs the same range.

Trace records address the *decompressed* byte space of each lower (after tar/ZFile
unwrapping), so replay reads the layers' unwrapped sources (`CommittedLayer.source`); the
reads below them (ZFile blocks of the remote blob) are what get fetched.

Mode selection mirrors upstream (init_image_file): accelerationLayer → replay
`<last lower's dir>/trace` if non-empty; else recordTracePath: size 0 → record, size > 0 →
replay; missing → off. Upstream's text "priority list" form is not supported (logged).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from ..format.trace import OP_READ, TraceRecord, build_trace, is_trace, parse_trace
from .core import Priority

log = logging.getLogger(__name__)

READ_PRIORITY: contextvars.ContextVar[Priority] = contextvars.ContextVar(
    "tcmu_obd_read_priority", default=Priority.FOREGROUND
)
MAX_PIECE = 1 << 20  # replay reads in ≤ 1 MiB pieces, as upstream's priority-list replay does


@dataclass
class ReplayStats:
    records: int = 0
    bytes: int = 0
    skipped: int = 0
    failed: int = 0


def trace_mode(cfg) -> tuple[str | None, str | None]:
    """("replay"|"record"|None, path) for an ImageConfig, following upstream's rules."""
    if cfg.acceleration_layer and cfg.lowers:
        last = cfg.lowers[-1]
        path = os.path.join(last.dir, "trace") if last.dir else ""
        if path and os.path.isfile(path) and os.path.getsize(path) > 0:
            return "replay", path
        return None, None
    path = cfg.record_trace_path
    if not path or not os.path.exists(path):
        return None, None
    return ("record" if os.path.getsize(path) == 0 else "replay"), path


def load_trace(path: str) -> list[TraceRecord] | None:
    """Parse a binary trace; None (logged) for the text priority-list form."""
    with open(path, "rb") as f:
        data = f.read()
    if not is_trace(data):
        log.warning("%s: priority-list prefetch files are not supported; ignoring", path)
        return None
    return parse_trace(data, source=path)


async def replay_trace(
    records: Sequence[TraceRecord],
    layers: Sequence,
    concurrency: int = 16,
    *,
    priority: Priority = Priority.PREFETCH,
) -> ReplayStats:
    """Read every "R" record from `layers[record.layer_index]` (BlobSources in decompressed
    space) with `concurrency` workers, in trace order. Failures are logged and skipped."""
    stats = ReplayStats()
    it = iter(records)

    async def worker() -> None:
        READ_PRIORITY.set(priority)  # this task's context only
        for rec in it:  # shared iterator: workers pop records in order
            if rec.op != OP_READ or not 0 <= rec.layer_index < len(layers) or rec.count <= 0:
                stats.skipped += 1
                continue
            src = layers[rec.layer_index]
            start = max(0, rec.offset)
            end = min(rec.offset + rec.count, src.size)
            if start >= end:
                stats.skipped += 1
                continue
            try:
                pos = start
                while pos < end:
                    n = min(MAX_PIECE, end - pos)
                    buf = bytearray(n)
                    await src.read_into(pos, memoryview(buf))
                    pos += n
                stats.records += 1
                stats.bytes += end - start
            except asyncio.CancelledError:
                raise
            except Exception as e:  # upstream: logged and skipped
                stats.failed += 1
                log.info("prefetch of layer %d [%d, +%d) failed: %s", rec.layer_index, rec.offset, rec.count, e)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    log.info("trace replay: %d records, %d bytes, %d skipped, %d failed",
             stats.records, stats.bytes, stats.skipped, stats.failed)
    return stats


class RecordingSource:
    """Wraps a lower's unwrapped source; every successful read becomes a trace record."""

    def __init__(self, inner, layer_index: int, recorder: "TraceRecorder"):
        self.inner, self.layer_index, self.recorder = inner, layer_index, recorder
        self.name, self.size = inner.name, inner.size

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.inner.read_into(offset, buf)
        self.recorder.add(TraceRecord(OP_READ, self.layer_index, len(buf), offset))

    async def aclose(self) -> None:
        await self.inner.aclose()


class TraceRecorder:
    """Record mode: `<trace>.lock` exists while recording; `stop()` writes the trace, removes
    the lock and creates `<trace>.ok` (upstream's protocol). Deleting the lock file stops
    recording (the daemon polls `lock_removed`)."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[TraceRecord] = []
        self.stopped = False
        with open(path + ".lock", "w"):
            pass

    def add(self, rec: TraceRecord) -> None:
        if not self.stopped:
            self.records.append(rec)

    @property
    def lock_removed(self) -> bool:
        return not os.path.exists(self.path + ".lock")

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(build_trace(self.records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        try:
            os.unlink(self.path + ".lock")
        except FileNotFoundError:
            pass
        with open(self.path + ".ok", "w"):
            pass
