"""asyncio NBD server, in-process, against MemoryImage and gated test images (no sleeps)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

import pytest

from tcmu_obd.errors import ImageIOError
from tcmu_obd.frontends.nbd import protocol as p
from tcmu_obd.frontends.nbd.server import NBDServer
from tcmu_obd.image.base import Extent
from tcmu_obd.image.memory import MemoryImage

from .test_nbd_protocol import client_flags, go_data, meta_data, opt, req

SIZE = 4 << 20
MiB = 1 << 20
TIMEOUT = 20


class Client:
    """A minimal NBD client speaking raw bytes (the tests' own; no shared code with the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer
        self.structured = False
        self.flags = 0
        self.size = 0

    @classmethod
    async def connect(cls, path: str, *, structured: bool = True, name: str = "") -> "Client":
        r, w = await asyncio.open_unix_connection(path)
        c = cls(r, w)
        greeting = await r.readexactly(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        data = client_flags()
        if structured:
            data += opt(p.OPT_STRUCTURED_REPLY) + opt(p.OPT_SET_META_CONTEXT, meta_data(name, (p.BASE_ALLOCATION,)))
        w.write(data + opt(p.OPT_GO, go_data(name)))
        while True:
            _, option, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
            payload = await r.readexactly(length)
            assert rtype < (1 << 31), (option, rtype, payload)
            if option == p.OPT_GO and rtype == p.REP_INFO and payload[:2] == b"\0\0":
                c.size, c.flags = struct.unpack(">QH", payload[2:])
            if option == p.OPT_GO and rtype == p.REP_ACK:
                break
        c.structured = structured
        return c

    def send(self, cmd: int, offset: int = 0, length: int = 0, *, cookie: int = 1, flags: int = 0, payload: bytes = b""):
        self.w.write(req(cmd, offset, length, flags=flags, cookie=cookie, payload=payload))

    async def reply(self, read_length: int | None = None) -> tuple[int, int, bytes, list]:
        """(cookie, error, data, chunks) for one whole reply; simple READ replies need read_length."""
        magic = struct.unpack(">I", await self.r.readexactly(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.r.readexactly(12))
            data = await self.r.readexactly(read_length) if (read_length and not error) else b""
            return cookie, error, data, []
        chunks = []
        error = 0
        while True:
            if chunks:
                magic = struct.unpack(">I", await self.r.readexactly(4))[0]
            assert magic == p.STRUCTURED_REPLY_MAGIC
            flags, rtype, cookie, length = struct.unpack(">HHQI", await self.r.readexactly(16))
            payload = await self.r.readexactly(length)
            chunks.append((rtype, payload))
            if rtype & (1 << 15):
                error = struct.unpack_from(">I", payload)[0]
            if flags & p.REPLY_FLAG_DONE:
                break
        return cookie, error, assemble(chunks), chunks

    async def close(self, disc: bool = True):
        if disc:
            self.send(p.CMD_DISC)
            await self.w.drain()
        self.w.close()
        try:
            await self.w.wait_closed()
        except OSError:
            pass


def assemble(chunks) -> bytes:
    parts = []
    for rtype, payload in chunks:
        if rtype == p.REPLY_TYPE_OFFSET_DATA:
            parts.append((struct.unpack_from(">Q", payload)[0], payload[8:]))
        elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack(">QI", payload)
            parts.append((off, bytes(n)))
    return b"".join(d for _, d in sorted(parts))


class GatedImage(MemoryImage):
    """MemoryImage whose reads at gated offsets wait for a gate; records starts and cancels."""

    def __init__(self, size: int, data: bytes = b"", **kw):
        super().__init__(size, data, **kw)
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.started_event = asyncio.Event()
        self.fail: dict[int, int] = {}  # offset -> errno
        self.fail_after: dict[int, int] = {}  # offset -> errno, raised once the gate opens
        self.holes: list[Extent] = []
        self.calls: list[tuple[str, int, int]] = []  # (op, offset, length) for writes/discards

    async def write(self, offset, data):
        self.calls.append(("write", offset, len(data)))
        await super().write(offset, data)

    async def discard(self, offset, length):
        self.calls.append(("discard", offset, length))
        await super().discard(offset, length)

    async def read_into(self, offset, buf):
        self.started.append(offset)
        self.started_event.set()
        if offset in self.fail:
            raise ImageIOError(f"injected failure at {offset}", self.fail[offset])
        gate = self.gates.get(offset)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(offset)
                raise
            if offset in self.fail_after:
                raise ImageIOError(f"injected failure after waiting at {offset}", self.fail_after[offset])
        await super().read_into(offset, buf)

    def extents(self, offset, length):
        return self.holes or super().extents(offset, length)


async def wait_for(pred, what: str):
    async def loop():
        while not pred():
            await asyncio.sleep(0)  # yield to the loop; bounded by the timeout below
    await asyncio.wait_for(loop(), TIMEOUT)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "nbd.sock")


def pattern(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


async def test_read_write_flush_trim_roundtrip(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    server = NBDServer(img, export_name="disk")
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path)
        assert c.size == SIZE and not c.flags & p.FLAG_READ_ONLY
        c.send(p.CMD_READ, 1000, 5000, cookie=11)
        cookie, err, data, _ = await c.reply()
        assert (cookie, err, data) == (11, 0, pattern(SIZE)[1000:6000])
        c.send(p.CMD_WRITE, 4096, 4096, cookie=12, flags=p.CMD_FLAG_FUA, payload=b"\xab" * 4096)
        assert (await c.reply())[:2] == (12, 0)
        assert img._buf[4096:8192] == b"\xab" * 4096 and img.flushes == 1
        c.send(p.CMD_FLUSH, cookie=13)
        assert (await c.reply())[:2] == (13, 0)
        c.send(p.CMD_TRIM, 0, 512, cookie=14)
        c.send(p.CMD_WRITE_ZEROES, 512, 512, cookie=15, flags=p.CMD_FLAG_NO_HOLE)
        got = {(await c.reply())[:2] for _ in range(2)}
        assert got == {(14, 0), (15, 0)} and img._buf[:1024] == bytes(1024)
        img.calls.clear()
        c.send(p.CMD_WRITE_ZEROES, 8192, 3 * MiB, cookie=19)  # may deallocate
        assert (await c.reply())[:2] == (19, 0)
        c.send(p.CMD_WRITE_ZEROES, 0, 3 * MiB, cookie=20, flags=p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA)
        assert (await c.reply())[:2] == (20, 0)
        assert img._buf[: 3 * MiB + 8192] == bytes(3 * MiB + 8192)
        assert img.calls == [("discard", 8192, 3 * MiB)] + [("write", i * MiB, MiB) for i in range(3)]
        c.send(p.CMD_CACHE, 0, 3 << 20, cookie=16)
        assert (await c.reply())[:2] == (16, 0)
        c.send(p.CMD_BLOCK_STATUS, 0, SIZE, cookie=17)
        cookie, err, _, chunks = await c.reply()
        assert chunks == [(p.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, SIZE, 0))]
        c.send(p.CMD_READ, SIZE - 512, 1024, cookie=18)  # beyond the end
        cookie, err, _, chunks = await c.reply()
        assert (cookie, err) == (18, p.EINVAL) and b"beyond" in chunks[0][1]
        await c.close()
    finally:
        await server.aclose()
    assert server.connections == 0


async def test_simple_replies_and_read_only(sock_path):
    img = MemoryImage(SIZE, pattern(SIZE))
    server = NBDServer(img, read_only=True)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path, structured=False)
        assert c.flags & p.FLAG_READ_ONLY
        c.send(p.CMD_READ, 0, 65536, cookie=1)
        assert await c.reply(65536) == (1, 0, pattern(65536), [])
        c.send(p.CMD_WRITE, 0, 512, cookie=2, payload=b"x" * 512)
        c.send(p.CMD_READ, 512, 512, cookie=3)
        assert (await c.reply())[:2] == (2, p.EPERM)
        assert (await c.reply(512))[:3] == (3, 0, pattern(1024)[512:])
        assert img._buf[:512] == pattern(512)
        await c.close()
    finally:
        await server.aclose()


async def test_sparse_reads_send_holes(sock_path):
    K = 32  # 32 x 8 KiB data, 32 x 16 KiB hole, 32 x 8 KiB data: 1 MiB
    data = b"\x11" * (8192 * K) + bytes(16384 * K) + b"\x22" * (8192 * K)
    img = GatedImage(len(data), data)
    img.holes = [Extent(0, 8192 * K, "data"), Extent(8192 * K, 16384 * K, "hole"), Extent(24576 * K, 8192 * K, "data")]
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path)
        c.send(p.CMD_READ, 0, len(data), cookie=1)
        cookie, err, got, chunks = await c.reply()
        assert got == data
        assert [t for t, _ in chunks] == [p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE, p.REPLY_TYPE_OFFSET_DATA]
        assert img.started == [0, 24576 * K]  # the hole was not read
        c.send(p.CMD_READ, 0, len(data), cookie=2, flags=p.CMD_FLAG_DF)  # don't fragment
        cookie, err, got, chunks = await c.reply()
        assert got == data and len(chunks) == 1
        c.send(p.CMD_BLOCK_STATUS, 0, len(data), cookie=3)
        _, _, _, chunks = await c.reply()
        assert chunks[0][1] == struct.pack(">IIIIIII", 1, 8192 * K, 0, 16384 * K, 3, 8192 * K, 0)
        c.send(p.CMD_BLOCK_STATUS, 0, len(data), cookie=4, flags=p.CMD_FLAG_REQ_ONE)
        _, _, _, chunks = await c.reply()
        assert chunks[0][1] == struct.pack(">III", 1, 8192 * K, 0)
        c.send(p.CMD_READ, 0, 65536, cookie=5)  # small reads skip the extent lookup
        cookie, err, got, chunks = await c.reply()
        assert got == data[:65536] and len(chunks) == 1
        await c.close()
    finally:
        await server.aclose()


async def test_out_of_order_replies_and_errors(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    img.gates[0] = asyncio.Event()
    img.gates[12288] = asyncio.Event()
    img.fail[8192] = errno.EIO
    img.fail_after[12288] = errno.EROFS
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path)
        c.send(p.CMD_READ, 0, 4096, cookie=1)  # blocks on the gate
        c.send(p.CMD_READ, 4096, 4096, cookie=2)
        c.send(p.CMD_READ, 8192, 4096, cookie=3)  # fails at once
        c.send(p.CMD_READ, 12288, 4096, cookie=4)  # fails after waiting
        first = [await c.reply(), await c.reply()]
        assert {r[:2] for r in first} == {(2, 0), (3, p.EIO)}
        img.gates[0].set()
        cookie, err, data, _ = await c.reply()
        assert (cookie, err, data) == (1, 0, pattern(4096))
        img.gates[12288].set()
        cookie, err, data, chunks = await c.reply()
        assert (cookie, err) == (4, p.EPERM) and b"injected" in chunks[0][1]
        await c.close()
    finally:
        await server.aclose()


async def test_many_connections_and_pipelined_requests(sock_path):
    expected = pattern(SIZE)
    img = MemoryImage(SIZE, expected)
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        async def worker(k: int):
            c = await Client.connect(sock_path, structured=bool(k % 2))
            n = 40
            for i in range(n):
                c.send(p.CMD_READ, (i * 65536 + k * 512) % (SIZE - 65536), 65536, cookie=i)
            seen = {}
            for _ in range(n):
                cookie, err, data, _ = await c.reply(65536)
                seen[cookie] = (err, data)
            for i in range(n):
                off = (i * 65536 + k * 512) % (SIZE - 65536)
                assert seen[i] == (0, expected[off : off + 65536])
            await c.close()

        await asyncio.wait_for(asyncio.gather(*(worker(k) for k in range(8))), TIMEOUT)
        assert server.stats["connections"] == 8
    finally:
        await server.aclose()


async def test_client_disconnect_mid_request_cancels_only_its_work(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    img.gates[0] = asyncio.Event()
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        other = await Client.connect(sock_path)
        c = await Client.connect(sock_path)
        c.send(p.CMD_READ, 0, 4096, cookie=1)
        await c.w.drain()
        await wait_for(lambda: 0 in img.started, "read started")
        await c.close(disc=False)  # hard disconnect while the read is in flight
        await wait_for(lambda: img.cancelled == [0], "in-flight read cancelled")
        await wait_for(lambda: server.connections == 1, "connection gone")
        other.send(p.CMD_READ, 4096, 4096, cookie=2)
        assert (await other.reply())[:3] == (2, 0, pattern(8192)[4096:])
        await other.close()
    finally:
        await server.aclose()


async def test_write_payload_then_disconnect_mid_payload(sock_path):
    img = MemoryImage(SIZE)
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path)
        c.w.write(req(p.CMD_WRITE, 0, 65536, cookie=1) + b"\x01" * 1000)
        await c.close(disc=False)
        await wait_for(lambda: server.connections == 0, "connection gone")
        assert img._buf[:1000] == bytes(1000)  # a partial write never reaches the image
    finally:
        await server.aclose()


async def test_in_flight_bound(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    gate = asyncio.Event()
    for i in range(64):
        img.gates[i * 4096] = gate
    server = NBDServer(img, max_in_flight=8)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path)
        for i in range(64):
            c.send(p.CMD_READ, i * 4096, 4096, cookie=i)
        await c.w.drain()
        await wait_for(lambda: len(img.started) == 8, "8 reads started")
        probe = await Client.connect(sock_path)  # a full round trip on another connection
        probe.send(p.CMD_FLUSH, cookie=1)
        assert (await probe.reply())[:2] == (1, 0)
        assert len(img.started) == 8
        gate.set()
        cookies = sorted([(await c.reply())[0] for _ in range(64)])
        assert cookies == list(range(64))
        await probe.close()
        await c.close()
    finally:
        await server.aclose()


async def test_protocol_garbage_closes_only_that_connection(sock_path):
    img = MemoryImage(SIZE, pattern(SIZE))
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        good = await Client.connect(sock_path)
        bad = await Client.connect(sock_path)
        bad.w.write(b"\xff" * 28)
        assert await bad.r.read() == b""  # server hung up
        good.send(p.CMD_READ, 0, 512, cookie=5)
        assert (await good.reply())[:2] == (5, 0)
        await good.close()
        await bad.close(disc=False)
    finally:
        await server.aclose()


async def test_aclose_finishes_in_flight_then_closes(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    img.gates[0] = asyncio.Event()
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    c = await Client.connect(sock_path)
    c.send(p.CMD_READ, 0, 4096, cookie=1)
    await c.w.drain()
    await wait_for(lambda: 0 in img.started, "read started")
    closing = asyncio.create_task(server.aclose())
    await wait_for(lambda: not server._servers, "stopped listening")
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(sock_path)
    img.gates[0].set()
    assert (await c.reply())[:3] == (1, 0, pattern(4096))
    await asyncio.wait_for(closing, TIMEOUT)
    assert await c.r.read() == b""
    assert server.connections == 0
    await c.close(disc=False)


async def test_aclose_grace_cancels_stuck_requests(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    img.gates[0] = asyncio.Event()  # never set
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    c = await Client.connect(sock_path)
    c.send(p.CMD_READ, 0, 4096, cookie=1)
    await c.w.drain()
    await wait_for(lambda: 0 in img.started, "read started")
    await asyncio.wait_for(server.aclose(grace=0), TIMEOUT)
    assert img.cancelled == [0] and server.connections == 0
    await c.close(disc=False)


async def test_old_style_export_name_and_unknown_name(sock_path):
    server = NBDServer(MemoryImage(SIZE), export_name="disk")
    await server.serve_unix(sock_path)
    try:
        r, w = await asyncio.open_unix_connection(sock_path)
        await r.readexactly(18)
        w.write(client_flags() + opt(p.OPT_EXPORT_NAME, b"disk"))
        size, flags = struct.unpack(">QH", await r.readexactly(10))
        assert size == SIZE and flags & p.FLAG_HAS_FLAGS
        w.write(req(p.CMD_FLUSH, cookie=3))
        assert struct.unpack(">IIQ", await r.readexactly(16)) == (p.SIMPLE_REPLY_MAGIC, 0, 3)
        w.close()
        r, w = await asyncio.open_unix_connection(sock_path)
        await r.readexactly(18)
        w.write(client_flags() + opt(p.OPT_EXPORT_NAME, b"nope"))
        assert await r.read() == b""  # cannot error: hard disconnect
        w.close()
    finally:
        await server.aclose()


async def test_tcp_and_stale_socket(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening, then abandoned: stale
    s.close()
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    server = NBDServer(MemoryImage(SIZE, pattern(SIZE)))
    try:
        await server.serve_unix(path)
        with pytest.raises(OSError, match="not a socket"):
            await server.serve_unix(str(not_a_socket))
        other = NBDServer(MemoryImage(SIZE))
        with pytest.raises(OSError, match="listening"):
            await other.serve_unix(path)
        srv = await server.serve_tcp("127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = Client(r, w)
        assert (await r.readexactly(18))[:8] == b"NBDMAGIC"
        w.write(client_flags() + opt(p.OPT_GO, go_data()))
        while struct.unpack(">QIII", hdr := await r.readexactly(20))[2] != p.REP_ACK:
            await r.readexactly(struct.unpack(">QIII", hdr)[3])
        c.send(p.CMD_READ, 0, 4096, cookie=9)
        assert await c.reply(4096) == (9, 0, pattern(4096), [])
        await c.close()
    finally:
        await server.aclose()
        await server.aclose()  # idempotent
    assert os.path.exists(str(not_a_socket))


async def test_slow_reader_backpressure_then_full_delivery(sock_path):
    expected = pattern(SIZE)
    img = GatedImage(SIZE, expected)
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path, structured=False)
        n = 48  # 48 MiB of replies: far more than socket buffers + WRITE_HIGH_WATER
        for i in range(n):
            c.send(p.CMD_READ, (i % 4) * MiB, MiB, cookie=i)
        await c.w.drain()
        (conn,) = server._connections
        await wait_for(lambda: not conn._can_write.is_set(), "writers throttled")
        assert conn._pending_bytes <= 8 * MiB + MiB  # bounded: tasks wait instead of queueing
        got = {}
        for _ in range(n):
            cookie, err, data, _ = await c.reply(MiB)
            got[cookie] = (err, data)
        assert all(got[i] == (0, expected[(i % 4) * MiB : (i % 4 + 1) * MiB]) for i in range(n))
        await c.close()
    finally:
        await server.aclose()


async def test_slow_reader_vanishing_leaks_nothing(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path)
        for i in range(48):
            c.send(p.CMD_READ, 0, MiB, cookie=i)
        await c.w.drain()
        (conn,) = server._connections
        await wait_for(lambda: not conn._can_write.is_set(), "writers throttled")
        tasks = set(conn.tasks)
        assert tasks  # some are parked on the write-side backpressure
        await c.close(disc=False)
        await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
        assert all(t.done() for t in tasks) and not conn.tasks
        assert server.connections == 0 and conn._fd == -1
    finally:
        await server.aclose()


async def test_disc_waits_for_in_flight_replies(sock_path):
    img = GatedImage(SIZE, pattern(SIZE))
    img.gates[0] = asyncio.Event()
    server = NBDServer(img)
    await server.serve_unix(sock_path)
    try:
        c = await Client.connect(sock_path)
        c.send(p.CMD_READ, 0, 4096, cookie=1)
        c.send(p.CMD_DISC)
        c.w.write_eof()
        await wait_for(lambda: 0 in img.started, "read started")
        img.gates[0].set()
        assert (await c.reply())[:3] == (1, 0, pattern(4096))  # replied before the close
        assert await c.r.read() == b""
        await c.close(disc=False)
    finally:
        await server.aclose()


async def test_raw_file_image(tmp_path):
    from tcmu_obd.errors import ReadOnlyError
    from tcmu_obd.tools.serve import RawFileImage

    path = tmp_path / "r.raw"
    with open(path, "wb") as f:
        f.write(b"\x01" * 65536)
        f.truncate(1 << 20)
    img = RawFileImage(str(path), read_only=False)
    assert img.size == 1 << 20 and img.block_size == 512
    assert img.extents(0, 1 << 20) == [Extent(0, 65536, "data"), Extent(65536, (1 << 20) - 65536, "hole")]
    assert img.extents(4096, 4096) == [Extent(4096, 4096, "data")]
    buf = bytearray(8192)
    await img.read_into(61440, memoryview(buf))
    assert buf == b"\x01" * 4096 + bytes(4096)
    img.THREAD_READ_MIN = 4096  # this read goes through the executor
    buf2 = bytearray(8192)
    await img.read_into(61440, memoryview(buf2))
    assert buf2 == buf
    await img.write(100, b"xyz")
    await img.discard(0, 50)
    await img.flush()
    await img.read_into(0, memoryview(buf))
    assert buf[:50] == bytes(50) and buf[100:103] == b"xyz" and buf[50:100] == b"\x01" * 50
    with pytest.raises(ImageIOError):
        await img.read_into((1 << 20) - 10, memoryview(buf))
    await img.aclose()
    ro = RawFileImage(str(path))
    with pytest.raises(ReadOnlyError):
        await ro.write(0, b"x")
    with pytest.raises(ReadOnlyError):
        await ro.discard(0, 1)
    await ro.aclose()


@pytest.mark.parametrize("when", ["before-first-step", "while-waiting", "never"])
async def test_resumed_coroutine_semantics(when):
    from tcmu_obd.frontends.nbd.server import _Resumed

    ev = asyncio.Event()
    trace = []

    async def body():
        try:
            await ev.wait()
            await asyncio.sleep(0)  # a bare yield too
            trace.append("resumed")
            return 42
        except asyncio.CancelledError:
            trace.append("cancelled")
            raise

    coro = body()
    first = coro.send(None)  # the eager first step, as _Connection._start does it
    task = asyncio.get_running_loop().create_task(_Resumed(coro, first))
    if when == "before-first-step":
        task.cancel()
    elif when == "while-waiting":
        await wait_for(lambda: ev._waiters and task._fut_waiter is not None, "task waiting")
        task.cancel()
    else:
        ev.set()
    if when == "never":
        assert await asyncio.wait_for(task, TIMEOUT) == 42
        assert trace == ["resumed"]
    else:
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trace == ["cancelled"]
    assert not ev._waiters  # nothing left behind
