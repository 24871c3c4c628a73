"""An emulated long, capped link: an in-process asyncio TCP proxy on 127.0.0.1.

Theory of operation
-------------------
Every accepted client connection gets one upstream connection to the target, opened after
one RTT (the TCP handshake a real link would cost), and two pumps, one per direction. A
pump reads what its source sends (at most CHUNK at a time), asks the direction's shared
token bucket when those bytes may leave (`Shaper.admit`: the rate cap, shared by all
connections, so concurrent streams split the link as they would on a real one), waits
until then before reading more (so at most one bandwidth-delay product is buffered, and the
sender is back-pressured like a full link), and queues the bytes for delivery half an RTT
later; a second task writes them out on time. So a request/response costs one RTT plus its
serialisation time, and a single stream can have at most what the sender pushes in flight.

This is an approximation: no TCP slow start, loss or receive-window limits on the emulated
path (loopback TCP underneath is fast), 1 ms timer grain. The real benchmark,
bench/fill_bench.py, runs the registry and client in two network namespaces joined by a TUN
delay line (bench/linkemu.py) so both ends run real kernel TCP over the emulated wire.

`Shaper` is the arithmetic alone (no I/O, no clock) and is unit-tested by counting tokens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from ..scheduler.control import TokenBucket

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


class Shaper:
    """One direction of the link: a rate cap (token bucket, bytes/s; 0 = none) and a delay."""

    def __init__(self, rate_bytes: float, delay_s: float, *, burst: float | None = None, now: float = 0.0):
        self.delay = delay_s
        burst = burst if burst is not None else max(CHUNK, rate_bytes * 0.005)
        self.bucket = TokenBucket(rate_bytes, burst=burst, now=now)

    @property
    def rate(self) -> float:
        return self.bucket.rate

    @property
    def bytes_admitted(self) -> int:
        return self.bucket.taken

    def admit(self, n: int, now: float) -> tuple[float, float]:
        """n bytes arrive at `now`. Returns (send_at, deliver_at): when the link has room for
        them (the pump waits until then before reading more) and when they come out."""
        send_at = now + self.bucket.reserve(n, now)
        return send_at, send_at + self.delay


class SlowLink:
    """127.0.0.1:<port> → target_host:target_port with `rtt_s` round trip and `rate_bytes`/s
    each way (0 = uncapped). `start()`, then point clients at `url`; `aclose()` ends it all."""

    def __init__(self, target_host: str, target_port: int, *, rtt_s: float, rate_bytes: float,
                 clock=time.monotonic):
        self.target = (target_host, target_port)
        self.rtt = rtt_s
        self.clock = clock
        now = clock()
        self.down = Shaper(rate_bytes, rtt_s / 2, now=now)  # target → client
        self.up = Shaper(rate_bytes, rtt_s / 2, now=now)  # client → target
        self.port = 0
        self.connections = 0
        self.bytes_down = 0  # delivered to clients
        self.bytes_up = 0  # delivered to the target
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "SlowLink":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(c_writer)
        u_writer = None
        try:
            await asyncio.sleep(self.rtt)  # the handshake's round trip
            u_reader, u_writer = await asyncio.open_connection(*self.target)
            self._writers.add(u_writer)
            async with asyncio.TaskGroup() as tg:  # one side failing ends the other
                tg.create_task(self._pump(c_reader, u_writer, self.up, "up"))
                tg.create_task(self._pump(u_reader, c_writer, self.down, "down"))
        except* OSError as eg:
            log.debug("link connection ended: %s", eg.exceptions[0])
        finally:
            for w in (c_writer, u_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: Shaper,
                    direction: str) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = asyncio.Event()
        eof = False

        async def deliver() -> None:
            while True:
                while not queue:
                    if eof:
                        return
                    ready.clear()
                    await ready.wait()
                due, data = queue.popleft()
                wait = due - self.clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                if direction == "down":
                    self.bytes_down += len(data)
                else:
                    self.bytes_up += len(data)
                await writer.drain()

        deliverer = asyncio.get_running_loop().create_task(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                send_at, due = shaper.admit(len(data), self.clock())
                queue.append((due, data))
                ready.set()
                wait = send_at - self.clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            eof = True
            ready.set()
            await deliverer
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
        finally:
            deliverer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await deliverer

    async def aclose(self) -> None:
        """Stop listening, cut every connection, wait for the pumps (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
