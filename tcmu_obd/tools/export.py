"""`tcmu-obd export CONFIG OUT`: the whole merged virtual disk as a raw image.

A file OUT is written sparse: holes, zeroed runs and all-zero data chunks are skipped and
the file is truncated to the virtual size. `-` streams every byte to stdout. Several chunks
are read concurrently so a remote image is fetched with more than one request in flight.
"""

from __future__ import annotations

import asyncio
import os
import sys

from ..config import load_global_config
from .progress import Progress
from .runtime import opened_image

CHUNK = 4 << 20
READ_AHEAD = 8  # chunks in flight; bounds memory to READ_AHEAD × CHUNK


def register(sub) -> None:
    p = sub.add_parser("export", help="write the merged virtual disk of an image as a raw file")
    p.add_argument("config", help="config.v1.json of the image")
    p.add_argument("out", help="output raw file, or - for stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a TTY")
    p.set_defaults(func=_main)


def _main(args) -> int:
    return asyncio.run(export(args.config, args.out, global_config_path=args.global_config,
                              progress=not args.no_progress))


def _chunks(image):
    """Yield (offset, length, needs_read) covering the disk; holes/zero runs need no read."""
    for ext in image.extents(0, image.size):
        off, end = ext.offset, ext.offset + ext.length
        while off < end:
            n = min(CHUNK - off % CHUNK, end - off)
            yield off, n, ext.kind == "data"
            off += n


async def export(config: str, out: str, *, global_config_path: str | None = None, progress: bool = True) -> None:
    gcfg = load_global_config(global_config_path)
    async with opened_image(config, gcfg, read_only=True, background_fill=False) as image:
        to_stdout = out == "-"
        fd = sys.stdout.buffer.fileno() if to_stdout else os.open(
            out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with Progress("export", image.size, enabled=progress and not to_stdout) as bar:
                await _copy(image, fd, to_stdout, bar)
            if not to_stdout:
                os.ftruncate(fd, image.size)
                os.fsync(fd)
        finally:
            if not to_stdout:
                os.close(fd)


async def _copy(image, fd: int, to_stdout: bool, bar) -> None:
    pending: list[tuple[int, int, asyncio.Task | None]] = []
    chunks = _chunks(image)
    zero_chunk = bytes(CHUNK)

    async def read(off: int, n: int) -> bytearray:
        buf = bytearray(n)
        await image.read_into(off, memoryview(buf))
        return buf

    def fill() -> None:
        while sum(1 for p in pending if p[2] is not None) < READ_AHEAD:
            nxt = next(chunks, None)
            if nxt is None:
                return
            off, n, needs_read = nxt
            pending.append((off, n, asyncio.ensure_future(read(off, n)) if needs_read else None))

    try:
        fill()
        while pending:
            off, n, task = pending.pop(0)
            data = await task if task is not None else None
            if to_stdout:
                _write_all(fd, data if data is not None else memoryview(zero_chunk)[:n], None)
            elif data is not None and data.count(0) != n:  # all-zero data stays a hole
                _write_all(fd, data, off)
            bar.advance(n)
            fill()
    finally:
        for _, _, task in pending:
            if task is not None:
                task.cancel()


def _write_all(fd: int, data, offset: int | None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n
