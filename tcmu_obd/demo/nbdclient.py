"""A minimal asyncio NBD client: fixed newstyle handshake, NBD_OPT_GO, pipelined READs.

Enough for the demo to time individual reads (time to first byte per file, small-read
latency during the fill); the whole-export hash uses a real client (nbdcopy) when present.
Simple replies only (structured replies are never negotiated), so a READ reply is the
16-byte header followed by exactly `length` bytes, or an error without data.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time

from ..errors import ObdError
from ..frontends.nbd import protocol as p


class NBDClientError(ObdError):
    """The server refused the export or a read, or broke the protocol."""


class NBDClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self.size = 0
        self.flags = 0
        self._handles = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, int, float]] = {}
        self._rx: asyncio.Task | None = None

    @classmethod
    async def connect_unix(cls, path: str, export_name: str = "") -> "NBDClient":
        reader, writer = await asyncio.open_unix_connection(path)
        c = cls(reader, writer)
        try:
            await c._handshake(export_name)
        except BaseException:
            writer.close()
            raise
        c._rx = asyncio.get_running_loop().create_task(c._receive())
        return c

    async def _handshake(self, name: str) -> None:
        r, w = self._reader, self._writer
        magic, opt_magic, _sflags = struct.unpack(">QQH", await r.readexactly(18))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NBDClientError("not a newstyle NBD server")
        w.write(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        w.write(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, len(data)) + data)
        await w.drain()
        while True:
            _m, _opt, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
            body = await r.readexactly(length) if length else b""
            if rtype == p.REP_ACK:
                break
            if rtype & (1 << 31):
                raise NBDClientError(f"server refused export {name!r}: reply {rtype:#x} {body[:200]!r}")
            if rtype == p.REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == p.INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", body[2:12])

    async def _receive(self) -> None:
        r = self._reader
        try:
            while True:
                magic, error, handle = struct.unpack(">IIQ", await r.readexactly(16))
                if magic != p.SIMPLE_REPLY_MAGIC:
                    raise NBDClientError(f"bad reply magic {magic:#x}")
                fut, length, _sent = self._pending.pop(handle, (None, 0, 0.0))
                if fut is None:
                    raise NBDClientError(f"reply for unknown handle {handle}")
                header_at = time.monotonic()
                if error:
                    if not fut.done():
                        fut.set_exception(NBDClientError(f"read failed: errno {error}"))
                    continue
                data = await r.readexactly(length)
                if not fut.done():
                    fut.set_result((data, header_at))
        except (asyncio.IncompleteReadError, ConnectionError, NBDClientError) as e:
            err = e if isinstance(e, NBDClientError) else NBDClientError(f"connection lost: {e}")
            for fut, _l, _s in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()

    async def read_timed(self, offset: int, length: int) -> tuple[bytes, float]:
        """(data, seconds until the reply header arrived)."""
        if self._rx is None or self._rx.done():
            raise NBDClientError("not connected")
        handle = next(self._handles)
        fut = asyncio.get_running_loop().create_future()
        sent = time.monotonic()
        self._pending[handle] = (fut, length, sent)
        self._writer.write(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, handle, offset, length))
        data, header_at = await fut
        return data, header_at - sent

    async def read(self, offset: int, length: int) -> bytes:
        return (await self.read_timed(offset, length))[0]

    async def aclose(self) -> None:
        """NBD_CMD_DISC, then close (idempotent)."""
        w = self._writer
        if w.is_closing():
            return
        try:
            w.write(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
            await w.drain()
        except ConnectionError:
            pass
        w.close()
        if self._rx is not None:
            self._rx.cancel()
            try:
                await self._rx
            except asyncio.CancelledError:
                pass
