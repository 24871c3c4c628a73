"""asyncio NBD server: the I/O shell around protocol.ServerConnection, serving one BlockImage.

Theory of operation
-------------------
`NBDServer` listens on unix and/or TCP sockets; every accepted connection gets one
`_Connection`, an asyncio.Protocol that feeds received bytes into a sans-IO
`ServerConnection` and runs each transmission request concurrently, so replies may leave
out of order (NBD allows it).  A request's first step runs eagerly inside `_process`;
only a request that has to wait (image I/O that suspends, write backpressure) becomes a
Task, so a warm image pays no Task or loop round trip per request.

Writes to the socket: each reply is a list of buffers queued whole, in one synchronous
call with no await in between, so replies never interleave (the event loop is
single-threaded; `_flush` is the single writer).  `_flush` writes with writev on our own
dup of the socket fd, with our own writer callback when the socket is full; the
transport only reads and closes.  Small replies queued in one loop iteration leave in
one writev; big ones (>= 64 KiB) leave at once, while the data is still cache-hot.
Read data goes from a pooled buffer filled by `image.read_into` to the kernel: no copy.

Flow control:
- at most `max_in_flight` requests and `max_in_flight_bytes` of request payload/result
  per connection; beyond that the connection stops reading (transport.pause_reading),
  so a fast client cannot make us buffer without bound;
- when more than WRITE_HIGH_WATER reply bytes are queued (the client reads slowly),
  request tasks wait before queueing more, until the queue drains below the low mark.

Lifecycle / cancel invariants:
- a client that disconnects (EOF, reset, protocol garbage) gets its in-flight tasks
  cancelled and awaited; nothing it started outlives its connection;
- NBD_CMD_DISC: stop reading, let in-flight requests finish and reply, then close;
- `aclose()`: stop listening, stop reading on every connection, wait up to `grace`
  seconds for in-flight requests, cancel what is left, close the transports.
The server never closes or flushes the image: its owner (the CLI) does, after aclose().
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import collections.abc
import itertools
import logging
import os
import socket
from typing import Any

from ...errors import ImageIOError
from ...image.base import BlockImage
from ...ops.counters import NBD_COMMANDS
from . import protocol as p

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 128 * 1024 * 1024
CACHE_CHUNK = 1024 * 1024
_ZEROS = memoryview(bytes(1024 * 1024))
MIN_HOLE_CHUNK = 4096  # holes smaller than this are sent as zero data
SEND_BUFFER = 4 * 1024 * 1024
IOV_MAX = 1024
FLUSH_NOW_BYTES = 64 * 1024  # replies this big are written at once, not batched
WRITE_HIGH_WATER = 8 * 1024 * 1024  # queued reply bytes above which request tasks wait
WRITE_LOW_WATER = 1024 * 1024
SPARSE_READ_MIN = 128 * 1024  # smaller reads are not worth an extent lookup
POOL_BYTES = 64 * 1024 * 1024  # read buffers kept for reuse, per server


class NBDServer:
    """Serve `image` as one NBD export to any number of connections (multi-conn safe)."""

    def __init__(
        self,
        image: BlockImage,
        *,
        export_name: str = "",
        read_only: bool = False,
        description: str = "tcmu-obd overlaybd image",
        max_in_flight: int = MAX_IN_FLIGHT,
        max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES,
        sparse_reads: bool = True,
    ):
        self.image = image
        self.read_only = bool(read_only or getattr(image, "read_only", False))
        self.export = p.Export(
            size=image.size,
            name=export_name,
            description=description,
            read_only=self.read_only,
        )
        self.max_in_flight = max_in_flight
        self.max_in_flight_bytes = max_in_flight_bytes
        self.sparse_reads = sparse_reads
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[_Connection] = set()
        self._pool: dict[int, list[bytearray]] = {}
        self._pool_bytes = 0
        self._closing = False
        self._socket_paths: list[str] = []  # unix sockets we created, removed again by aclose()
        self.stats = {"connections": 0, "requests": 0, "errors": 0}

    def __repr__(self) -> str:
        return f"<NBDServer export={self.export.name!r} size={self.export.size} connections={len(self._connections)}>"

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def serve_unix(self, path: str) -> asyncio.base_events.Server:
        """Listen on a unix socket at `path` (an existing socket file there is replaced)."""
        loop = asyncio.get_running_loop()
        _remove_stale_socket(path)
        server = await loop.create_unix_server(self._make_protocol, path=path)
        self._servers.append(server)
        self._socket_paths.append(path)
        return server

    async def serve_tcp(self, host: str, port: int) -> asyncio.base_events.Server:
        """Listen on TCP host:port (port 0 picks one; see server.sockets)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._make_protocol, host=host, port=port, reuse_address=True)
        self._servers.append(server)
        return server

    def _get_buffer(self, size: int) -> bytearray:
        free = self._pool.get(size)
        if free:
            self._pool_bytes -= size
            return free.pop()
        return bytearray(size)

    def _put_buffer(self, buf: bytearray) -> None:
        if self._pool_bytes + len(buf) <= POOL_BYTES:
            self._pool.setdefault(len(buf), []).append(buf)
            self._pool_bytes += len(buf)

    def _make_protocol(self) -> "_Connection":
        return _Connection(self)

    async def aclose(self, grace: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish (up to `grace` s), close every connection.

        Idempotent.
        """
        self._closing = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for conn in list(self._connections):
            conn.stop_reading()
        waiters = [asyncio.ensure_future(c.drain_requests()) for c in self._connections]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=grace)
            for w in pending:
                w.cancel()
        for conn in list(self._connections):
            conn.abort("server shutting down")
        conns = list(self._connections)
        if conns:
            await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
        for server in servers:
            await server.wait_closed()
        paths, self._socket_paths = self._socket_paths, []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class _Resumed(collections.abc.Coroutine):
    """A coroutine that already ran up to its first suspension, ready to become a Task.

    `first` is what it yielded there (a future, or None for a bare yield).  The Task's
    first send() gets `first` back, so the Task waits on that future exactly as if it had
    run the step itself; every later send/throw (the Task's CancelledError included, even
    one thrown before the first send) goes straight to the coroutine.
    """

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro, first):
        self._coro = coro
        self._first = first
        self._started = False

    def send(self, value):
        if not self._started:
            self._started = True
            first, self._first = self._first, None
            return first
        return self._coro.send(value)

    def throw(self, typ, val=None, tb=None):
        self._started = True
        self._first = None
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self):
        self._first = None
        self._coro.close()

    def __await__(self):
        raise TypeError("_Resumed is only for asyncio.Task")

    def __repr__(self) -> str:
        return f"<_Resumed {self._coro!r}>"


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to remove anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    import stat

    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listening: stale
    else:
        raise OSError(f"{path}: another server is listening there")
    finally:
        probe.close()


class _Connection(asyncio.Protocol):
    """One client connection (see the module docstring for the invariants)."""

    def __init__(self, server: NBDServer):
        self.server = server
        self.image = server.image
        self.conn = p.ServerConnection(server.export)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task] = set()
        self.in_flight_bytes = 0
        self.reading_paused = False
        self.stopped = False  # no more requests will be parsed
        self.lost = False  # connection_lost seen
        self.disconnecting = False  # NBD_CMD_DISC: close once idle
        self.closed = asyncio.get_running_loop().create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flushed = asyncio.Event()  # nothing queued for the socket
        self._flushed.set()
        self.peer: Any = None
        self._fd = -1
        self._pending: collections.deque = collections.deque()  # (buffer, pooled-or-None)
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._writer_registered = False
        self._close_when_flushed = False

    def __repr__(self) -> str:
        return f"<NBD connection {self.peer!r} {self.conn.state.name} in_flight={len(self.tasks)}>"

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or transport.get_extra_info("sockname")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:  # big replies should leave in one writev (capped by net.core.wmem_max)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            # Our own fd for the socket: replies are written by _flush with writev and
            # our own writer callback (the transport only reads and closes), so no reply
            # byte is ever copied into the transport's buffer.
            self._fd = os.dup(sock.fileno())
            os.set_blocking(self._fd, False)
        if self.server._closing:
            transport.abort()
            return
        self.server._connections.add(self)
        self.server.stats["connections"] += 1
        self._send([self.conn.data_to_send()])

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self.conn.receive_data(data)
        except p.ProtocolError as e:
            self.abort(f"protocol error: {e}")
            return
        self._process()

    def eof_received(self) -> bool | None:
        try:
            self.conn.receive_data(b"")
        except p.ProtocolError:
            pass
        if not self.stopped:
            self._process()
        if self.disconnecting or self.conn.state is p.State.CLOSED:
            return True  # DISC/ABORT: we close ourselves once queued replies are flushed
        # Peer went away without NBD_CMD_DISC: nobody will read our replies.
        self.abort("peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # Cancel invariant: every request task is cancelled here and `closed` resolves only
        # once the last one has finished (_done), so nothing outlives the connection.
        self.stopped = True
        self.lost = True
        for task in self.tasks:
            task.cancel()
        self._can_write.set()  # wake writers so they notice
        if self._writer_registered:
            asyncio.get_running_loop().remove_writer(self._fd)
            self._writer_registered = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pending.clear()
        self._pending_bytes = 0
        self._flushed.set()
        self.server._connections.discard(self)
        if not self.tasks and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:  # the transport writes nothing itself; kept for safety
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- control ---------------------------------------------------------------------

    def stop_reading(self) -> None:
        """No more requests from this connection (shutdown)."""
        self.stopped = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.pause_reading()
            except RuntimeError:
                pass

    async def drain_requests(self) -> None:
        """Wait until no request is in flight and every reply is written."""
        await self._idle.wait()
        await self._flushed.wait()

    def abort(self, reason: str) -> None:
        """Hard disconnect now (in-flight tasks are cancelled in connection_lost)."""
        if reason and not reason.startswith("server shutting down"):
            log.debug("%r: closing: %s", self, reason)
        self.stopped = True
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    # -- parsing ---------------------------------------------------------------------

    def _process(self) -> None:
        """Pull events until the protocol needs data or we must stop for flow control."""
        conn = self.conn
        while not self.stopped:
            if len(self.tasks) >= self.server.max_in_flight or (
                self.in_flight_bytes >= self.server.max_in_flight_bytes and self.tasks
            ):
                self._pause_reading()
                return
            try:
                event = conn.next_event()
            except p.ProtocolError as e:
                self._send([conn.data_to_send()])
                self.abort(f"protocol error: {e}")
                return
            out = conn.data_to_send()
            if out:
                self._send([out])
            if event is p.NEED_DATA:
                self._resume_reading()
                return
            if isinstance(event, p.Request):
                self._start(event)
            elif isinstance(event, p.Ready):
                log.debug("%r: transmission: %s", self, event)
            elif isinstance(event, p.Disconnect):
                self.stopped = True
                self.disconnecting = True
                if not self.tasks:
                    self._close_after_flush()
                return

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self.reading_paused = True

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self.reading_paused = False

    def _start(self, req: p.Request) -> None:
        """Run a request: its first step eagerly, here; a Task only if it has to wait.

        Most requests on a warm image never suspend (the image answers from memory or
        the page cache), and skipping Task creation and one loop round trip per request
        is a large part of the per-request cost.  A request that does suspend continues
        in a Task (`_Resumed`), tracked, cancellable and awaited like any other.
        """
        self.server.stats["requests"] += 1
        coro = self._run(req)
        try:
            first = coro.send(None)
        except StopIteration:
            return  # done synchronously: nothing in flight
        except BaseException as e:  # a bug in _run: never silently
            log.error("%r: request failed", self, exc_info=e)
            self.abort("internal error")
            return
        cost = req.length if req.command in (p.CMD_READ, p.CMD_WRITE) and not req.error else 0
        self.in_flight_bytes += cost
        task = asyncio.get_running_loop().create_task(_Resumed(coro, first))
        self.tasks.add(task)
        self._idle.clear()
        task.add_done_callback(lambda t, cost=cost: self._done(t, cost))

    def _done(self, task: asyncio.Task, cost: int) -> None:
        self.tasks.discard(task)
        self.in_flight_bytes -= cost
        if not task.cancelled() and task.exception() is not None:  # a bug: never silently
            log.error("%r: request task failed", self, exc_info=task.exception())
            self.abort("internal error")
        if self.tasks:
            if not self.stopped and self.reading_paused:
                self._process()
            return
        self._idle.set()
        if self.lost:
            if not self.closed.done():
                self.closed.set_result(None)
        elif self.disconnecting:
            self._close_after_flush()
        elif not self.stopped and self.reading_paused:
            self._process()

    def _send(self, buffers: list, release: bytearray | None = None) -> None:
        """Queue one reply (or handshake bytes), in order; it is never interleaved.

        Replies queued during one event-loop iteration leave together in one writev
        (`_flush`, scheduled with call_soon): with many requests in flight that is one
        syscall and one peer wake-up per batch instead of per reply.  `release` is a
        pooled buffer the reply points into; it returns to the pool once fully sent.
        """
        if self.lost or self._fd < 0:
            if not self.lost and self.transport is not None:  # no socket object: plain path
                self.transport.write(b"".join(b for b in buffers if b))
            if release is not None:
                self.server._put_buffer(release)
            return
        items = [b for b in buffers if b]
        size = 0
        for i, b in enumerate(items):
            n = memoryview(b).nbytes
            size += n
            self._pending.append((b, release if i == len(items) - 1 else None))
            self._pending_bytes += n
        if not items and release is not None:
            self.server._put_buffer(release)
        if items:
            self._flushed.clear()
        if self._pending_bytes > WRITE_HIGH_WATER:
            self._can_write.clear()
        if self._writer_registered:
            return  # the writer callback will get to it
        if size >= FLUSH_NOW_BYTES:
            # Big replies leave now, while the data is still in the CPU cache (batching
            # many 256 KiB reads before one writev costs a cache-cold second copy).
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write queued buffers with writev until done or the socket is full; then wait
        for writability with our own writer callback.  Nothing is copied."""
        self._flush_scheduled = False
        pending = self._pending
        while pending and self._fd >= 0:
            batch = [b for b, _ in itertools.islice(pending, IOV_MAX)]
            try:
                sent = os.writev(self._fd, batch)
            except (BlockingIOError, InterruptedError):
                sent = -1
            except OSError as e:
                self.abort(f"send failed: {e}")
                return
            if sent < 0:
                break
            self._pending_bytes -= sent
            while sent:
                b, release = pending[0]
                n = memoryview(b).nbytes
                if sent >= n:
                    pending.popleft()
                    sent -= n
                    if release is not None:
                        self.server._put_buffer(release)
                else:
                    pending[0] = (memoryview(b)[sent:], release)
                    sent = 0
            if pending and len(batch) < IOV_MAX:
                break  # partial write: the socket is full
        loop = asyncio.get_running_loop()
        if self._pending_bytes <= WRITE_LOW_WATER:
            self._can_write.set()
        if pending and self._fd >= 0:
            if not self._writer_registered:
                loop.add_writer(self._fd, self._flush)
                self._writer_registered = True
            return
        if self._writer_registered:
            loop.remove_writer(self._fd)
            self._writer_registered = False
        self._flushed.set()
        if self._close_when_flushed and self.transport is not None:
            self.transport.close()

    def _close_after_flush(self) -> None:
        """Close once every queued reply is written (after NBD_CMD_DISC)."""
        self._close_when_flushed = True
        if not self._pending and not self._flush_scheduled and self.transport is not None:
            self.transport.close()

    # -- request execution -----------------------------------------------------------

    async def _run(self, req: p.Request) -> None:
        conn = self.conn
        if req.error:
            self.server.stats["errors"] += 1
            NBD_COMMANDS.record(self.server.export.name, req.command, req.error)
            await self._reply(conn.reply_error(req.cookie, req.error, req.message))
            return
        pooled = None
        status = 0  # the errno replied (metrics)
        try:
            if req.command == p.CMD_READ:
                pooled = self.server._get_buffer(req.length)
                reply = await self._read(req, pooled)
            else:
                reply = await self._execute(req)
        except ImageIOError as e:
            self.server.stats["errors"] += 1
            log.info("%r: %s [%d, +%d): %s", self, req.name, req.offset, req.length, e)
            status = e.errno
            reply = conn.reply_error(req.cookie, e.errno, f"{req.name}: {e}")
        except OSError as e:
            self.server.stats["errors"] += 1
            log.warning("%r: %s [%d, +%d): %s", self, req.name, req.offset, req.length, e)
            status = e.errno or p.EIO
            reply = conn.reply_error(req.cookie, e.errno or p.EIO, f"{req.name}: {e.strerror or e}")
        NBD_COMMANDS.record(self.server.export.name, req.command, status)
        await self._reply(reply, pooled)

    async def _reply(self, buffers: list, release: bytearray | None = None) -> None:
        if not self._can_write.is_set():
            await self._can_write.wait()
        self._send(buffers, release)  # queued whole: replies never interleave

    async def _read(self, req: p.Request, buf: bytearray) -> list:
        """READ into `buf` (a pooled buffer of exactly req.length bytes, stale contents).

        Every byte sent is one read_into filled; hole runs are not read and not sent.
        """
        conn, image = self.conn, self.image
        view = memoryview(buf)
        if (
            conn.structured_replies
            and self.server.sparse_reads
            and req.length >= SPARSE_READ_MIN
            and not (req.flags & p.CMD_FLAG_DF)
        ):
            holes = self._holes(req.offset, req.length)
            if holes:
                cursor = req.offset
                for h_off, h_len in holes:  # read only the data between holes
                    if h_off > cursor:
                        await image.read_into(cursor, view[cursor - req.offset : h_off - req.offset])
                    cursor = h_off + h_len
                if cursor < req.offset + req.length:
                    await image.read_into(cursor, view[cursor - req.offset :])
                return conn.reply_read(req.cookie, req.offset, view, holes)
        await image.read_into(req.offset, view)
        return conn.reply_read(req.cookie, req.offset, view)

    async def _execute(self, req: p.Request) -> list:
        conn, image, cmd = self.conn, self.image, req.command
        if cmd == p.CMD_WRITE:
            await image.write(req.offset, req.data)  # type: ignore[arg-type]
            if req.fua:
                await image.flush()
            return conn.reply_ok(req.cookie)
        if cmd == p.CMD_FLUSH:
            await image.flush()
            return conn.reply_ok(req.cookie)
        if cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            if cmd == p.CMD_WRITE_ZEROES and req.flags & p.CMD_FLAG_NO_HOLE:
                # NO_HOLE: the client wants the range allocated, so write real zeroes.
                pos, end = req.offset, req.offset + req.length
                while pos < end:
                    n = min(len(_ZEROS), end - pos)
                    await image.write(pos, _ZEROS[:n])
                    pos += n
            else:
                # discard makes the range read as zeroes: a TRIM, or a WRITE_ZEROES that
                # may deallocate.
                await image.discard(req.offset, req.length)
            if req.fua:
                await image.flush()
            return conn.reply_ok(req.cookie)
        if cmd == p.CMD_CACHE:
            scratch = memoryview(bytearray(min(CACHE_CHUNK, req.length)))
            pos, end = req.offset, req.offset + req.length
            while pos < end:
                n = min(len(scratch), end - pos)
                await image.read_into(pos, scratch[:n])
                pos += n
            return conn.reply_ok(req.cookie)
        if cmd == p.CMD_BLOCK_STATUS:
            extents = self.image.extents(req.offset, req.length)
            descs = p.allocation_descriptors(extents, req.offset, req.length)
            return conn.reply_block_status(req.cookie, descs, req_one=bool(req.flags & p.CMD_FLAG_REQ_ONE))
        raise ImageIOError(f"command {cmd} not implemented", p.EINVAL)  # _check() rejects these

    def _holes(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Zero/hole runs (>= MIN_HOLE_CHUNK) inside a read, from the image's extent map."""
        try:
            extents = self.image.extents(offset, length)
        except (ImageIOError, NotImplementedError, AttributeError):
            return []
        holes: list[tuple[int, int]] = []
        end = offset + length
        for ext in sorted(extents, key=lambda e: e.offset):
            if ext.kind == "data":
                continue
            start = max(ext.offset, offset)
            stop = min(ext.offset + ext.length, end)
            if holes and start <= holes[-1][0] + holes[-1][1]:
                last_off, last_len = holes.pop()
                start = last_off
                stop = max(stop, last_off + last_len)
            if stop - start > 0:
                holes.append((start, stop - start))
        return [h for h in holes if h[1] >= MIN_HOLE_CHUNK]
