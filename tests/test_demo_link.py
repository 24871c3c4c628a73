"""The demo's emulated link: Shaper arithmetic (tokens counted, fake clock) and the proxy's I/O
(bytes intact both ways, every byte charged to the shared bucket, nothing left after aclose)."""

from __future__ import annotations

import asyncio
import os

import pytest

from tcmu_obd.demo.link import CHUNK, Shaper, SlowLink


# ---------------------------------------------------------------------------------------------
# Shaper: no I/O, no clock


def test_uncapped_shaper_only_delays():
    s = Shaper(0, 0.1)
    assert s.admit(10 << 20, 5.0) == (5.0, pytest.approx(5.1))
    assert s.bytes_admitted == 10 << 20


def test_shaper_enforces_the_cap_by_tokens():
    rate, burst = 1_000_000.0, 65536.0
    s = Shaper(rate, 0.1, burst=burst, now=0.0)
    now = 0.0
    sent = 0
    schedule = []
    for _ in range(200):  # a pump: admit a chunk, wait until send_at, read the next
        send_at, deliver_at = s.admit(CHUNK, now)
        assert deliver_at == pytest.approx(send_at + 0.1)
        sent += CHUNK
        schedule.append((send_at, sent))
        now = max(now, send_at)
    assert s.bytes_admitted == sent == 200 * CHUNK
    # by any release time t, at most burst + rate*t bytes have been let through
    for send_at, cum in schedule:
        assert cum <= burst + rate * send_at + 1e-6 * rate
    assert schedule[-1][0] == pytest.approx((sent - burst) / rate)


def test_shaper_bucket_is_shared_by_interleaved_streams():
    rate = 500_000.0
    s = Shaper(rate, 0.0, burst=CHUNK, now=0.0)
    a = [s.admit(CHUNK, 0.0)[0] for _ in range(5)]
    b = [s.admit(CHUNK, 0.0)[0] for _ in range(5)]
    # ten chunks at t=0 from "two connections" queue behind each other on one link
    assert b[-1] == pytest.approx((10 * CHUNK - CHUNK) / rate)
    assert a == sorted(a) and b[0] > a[-1]


# ---------------------------------------------------------------------------------------------
# SlowLink: real sockets on 127.0.0.1


class Echo:
    """Upstream server: echoes every byte back, closes its side after the client's EOF."""

    def __init__(self):
        self.server = None
        self.received = 0

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            self.received += len(data)
            w.write(data)
            await w.drain()
        w.close()

    async def __aenter__(self) -> "Echo":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


async def roundtrip(port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), 100_000):
            w.write(payload[i: i + 100_000])
            await w.drain()
        w.write_eof()

    sender = asyncio.ensure_future(send())
    got = bytearray()
    while data := await r.read(1 << 16):
        got += data
    await sender
    w.close()
    return bytes(got)


@pytest.mark.parametrize("rate", [0, 200e6])
async def test_link_bytes_intact_and_charged(rate):
    payload = os.urandom(3 << 20)
    async with Echo() as echo:
        link = await SlowLink("127.0.0.1", echo.port, rtt_s=0.0, rate_bytes=rate).start()
        try:
            got = await roundtrip(link.port, payload)
        finally:
            await link.aclose()
    assert got == payload
    assert echo.received == len(payload)
    assert link.bytes_up == link.bytes_down == len(payload)
    # every byte in each direction was charged to that direction's bucket
    assert link.up.bytes_admitted == link.down.bytes_admitted == len(payload)


async def test_link_bucket_shared_across_connections():
    a, b = os.urandom(1 << 20), os.urandom(700_000)
    async with Echo() as echo:
        link = await SlowLink("127.0.0.1", echo.port, rtt_s=0.002, rate_bytes=300e6).start()
        try:
            got = await asyncio.gather(roundtrip(link.port, a), roundtrip(link.port, b))
        finally:
            await link.aclose()
    assert got == [a, b]
    assert link.connections == 2
    assert link.down.bytes_admitted == len(a) + len(b)


async def test_link_aclose_cuts_open_connections():
    async with Echo() as echo:
        link = await SlowLink("127.0.0.1", echo.port, rtt_s=0.0, rate_bytes=0).start()
        r, w = await asyncio.open_connection("127.0.0.1", link.port)
        w.write(b"ping")
        await w.drain()
        assert await r.readexactly(4) == b"ping"
        await link.aclose()
        assert await r.read() == b""  # the proxy closed our connection
        w.close()
        assert not link._tasks and not link._writers
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", link.port)
