"""Sans-IO NBD protocol: every option and command, fed whole, byte by byte and with trailing data."""

from __future__ import annotations

import errno
import struct

import pytest

from tcmu_obd.frontends.nbd import protocol as p
from tcmu_obd.image.base import Extent

SIZE = 1 << 20
FEED_MODES = ["whole", "bytewise", "trailing"]


# --- client-side byte builders (the tests' own, independent of the module's encoders) ---


def client_flags(flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data


def go_data(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name: str = "", queries: tuple[str, ...] = ()) -> bytes:
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def req(cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 7, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """[(option, reply type, payload)] from server option-reply bytes (all of them)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == p.OPT_REPLY_MAGIC
        pos += 20
        out.append((option, rtype, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def feed(conn: p.ServerConnection, data: bytes, mode: str = "whole") -> list:
    """Feed data per `mode`, collecting events until NEED_DATA after the last byte."""
    events = []

    def drain():
        while (ev := conn.next_event()) is not p.NEED_DATA:
            events.append(ev)

    if mode == "bytewise":
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
            drain()
    elif mode == "trailing":
        # everything at once plus the first byte of a next message: must stay buffered
        conn.receive_data(data + b"\x49")
        drain()
        assert conn.buffered == 1
        conn._buf.pop()  # take the trailing byte back out, so callers can keep going
    else:
        conn.receive_data(data)
        drain()
    return events


def new_conn(**kw) -> p.ServerConnection:
    kw.setdefault("size", SIZE)
    kw.setdefault("name", "disk")
    kw.setdefault("description", "a test disk")
    return p.ServerConnection(p.Export(**kw))


def to_transmission(conn: p.ServerConnection, *, structured: bool = True, meta: bool = True) -> p.Ready:
    conn.data_to_send()
    data = client_flags()
    if structured:
        data += opt(p.OPT_STRUCTURED_REPLY)
    if meta:
        data += opt(p.OPT_SET_META_CONTEXT, meta_data("", (p.BASE_ALLOCATION,)))
    data += opt(p.OPT_GO, go_data(""))
    events = feed(conn, data)
    conn.data_to_send()
    assert len(events) == 1 and isinstance(events[0], p.Ready)
    return events[0]


# --- handshake ----------------------------------------------------------------------


def test_greeting():
    conn = new_conn()
    assert conn.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)
    assert conn.data_to_send() == b""
    assert conn.state is p.State.CLIENT_FLAGS
    assert "CLIENT_FLAGS" in repr(conn)


@pytest.mark.parametrize("mode", FEED_MODES)
def test_go_with_info_requests(mode):
    conn = new_conn()
    conn.data_to_send()
    data = client_flags() + opt(
        p.OPT_GO, go_data("disk", (p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE, 999))
    )
    events = feed(conn, data, mode)
    assert events == [p.Ready("disk", False, (), conn.transmission_flags)]
    assert conn.state is p.State.TRANSMISSION
    replies = parse_option_replies(conn.data_to_send())
    assert all(r[0] == p.OPT_GO for r in replies)
    assert replies[-1][1] == p.REP_ACK
    infos = {struct.unpack_from(">H", r[2])[0]: r[2][2:] for r in replies if r[1] == p.REP_INFO}
    size, flags = struct.unpack(">QH", infos[p.INFO_EXPORT])
    assert size == SIZE
    assert flags & p.FLAG_HAS_FLAGS and flags & p.FLAG_SEND_FLUSH and flags & p.FLAG_CAN_MULTI_CONN
    assert flags & p.FLAG_SEND_TRIM and flags & p.FLAG_SEND_WRITE_ZEROES and flags & p.FLAG_SEND_FUA
    assert not flags & p.FLAG_READ_ONLY and not flags & p.FLAG_SEND_DF  # DF needs structured replies
    assert struct.unpack(">III", infos[p.INFO_BLOCK_SIZE]) == (512, 4096, 32 * 1024 * 1024)
    assert infos[p.INFO_NAME] == b"disk"
    assert infos[p.INFO_DESCRIPTION] == b"a test disk"
    assert 999 not in infos


def test_info_then_go_same_flags_read_only():
    conn = new_conn(read_only=True)
    conn.data_to_send()
    events = feed(conn, client_flags() + opt(p.OPT_STRUCTURED_REPLY) + opt(p.OPT_INFO, go_data()))
    assert events == [] and conn.state is p.State.OPTIONS
    info = parse_option_replies(conn.data_to_send())[1:]  # [0] is STRUCTURED_REPLY's ACK
    events = feed(conn, opt(p.OPT_GO, go_data()))
    go = parse_option_replies(conn.data_to_send())
    assert [r[1:] for r in info] == [r[1:] for r in go]
    flags = struct.unpack(">QH", go[0][2][2:])[1]
    assert flags & p.FLAG_READ_ONLY and flags & p.FLAG_SEND_DF and flags & p.FLAG_SEND_CACHE
    assert not flags & (p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_FUA)
    assert events[0].structured_replies and events[0].transmission_flags == flags


@pytest.mark.parametrize("no_zeroes", [True, False])
@pytest.mark.parametrize("mode", FEED_MODES)
def test_export_name_old_style(no_zeroes, mode):
    conn = new_conn()
    conn.data_to_send()
    flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)
    events = feed(conn, client_flags(flags) + opt(p.OPT_EXPORT_NAME, b"disk"), mode)
    assert isinstance(events[0], p.Ready) and events[0].export_name == "disk"
    out = conn.data_to_send()
    assert len(out) == (10 if no_zeroes else 134)
    size, tflags = struct.unpack_from(">QH", out)
    assert size == SIZE and tflags == conn.transmission_flags
    assert out[10:] == bytes(len(out) - 10)


def test_export_name_unknown_is_fatal_and_sticky():
    conn = new_conn()
    conn.receive_data(client_flags() + opt(p.OPT_EXPORT_NAME, b"other"))
    with pytest.raises(p.ProtocolError, match="unknown export"):
        conn.next_event()
    assert conn.state is p.State.ERROR
    with pytest.raises(p.ProtocolError):
        conn.next_event()
    with pytest.raises(p.ProtocolError):
        conn.receive_data(b"x")


def test_export_name_oversize_is_fatal_before_buffering():
    conn = new_conn()
    conn.receive_data(client_flags() + struct.pack(">QII", p.IHAVEOPT, p.OPT_EXPORT_NAME, 1 << 30))
    with pytest.raises(p.ProtocolError):
        conn.next_event()


def test_go_unknown_export_and_malformed_stay_in_options():
    conn = new_conn()
    conn.data_to_send()
    bad = [
        opt(p.OPT_GO, go_data("nope")),
        opt(p.OPT_GO, b"\x00\x00"),  # too short
        opt(p.OPT_GO, struct.pack(">I", 100) + b"disk" + b"\x00\x00"),  # name beyond data
        opt(p.OPT_GO, go_data("disk", (1,))[:-1]),  # info count mismatch
        opt(p.OPT_INFO, go_data("\udcff".encode("utf-8", "surrogatepass").decode("latin-1"))),
    ]
    events = feed(conn, client_flags() + b"".join(bad))
    assert events == []
    replies = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [p.REP_ERR_UNKNOWN] + [p.REP_ERR_INVALID] * 3 + [p.REP_ERR_UNKNOWN]
    assert conn.state is p.State.OPTIONS
    events = feed(conn, opt(p.OPT_GO, go_data("disk")))
    assert isinstance(events[0], p.Ready)


@pytest.mark.parametrize("mode", FEED_MODES)
def test_list_abort_structured_and_unsupported(mode):
    conn = new_conn()
    conn.data_to_send()
    data = (
        client_flags()
        + opt(p.OPT_LIST)
        + opt(p.OPT_LIST, b"x")
        + opt(p.OPT_STARTTLS)
        + opt(99, b"ignored")
        + opt(p.OPT_STRUCTURED_REPLY, b"x")
        + opt(p.OPT_STRUCTURED_REPLY)
        + opt(p.OPT_ABORT)
    )
    conn.receive_data(data)
    events = []
    while (ev := conn.next_event()) is not p.NEED_DATA:
        events.append(ev)
    assert events == [p.Disconnect("NBD_OPT_ABORT")]
    assert conn.state is p.State.CLOSED
    replies = parse_option_replies(conn.data_to_send())
    assert [(r[0], r[1]) for r in replies] == [
        (p.OPT_LIST, p.REP_SERVER),
        (p.OPT_LIST, p.REP_ACK),
        (p.OPT_LIST, p.REP_ERR_INVALID),
        (p.OPT_STARTTLS, p.REP_ERR_UNSUP),
        (99, p.REP_ERR_UNSUP),
        (p.OPT_STRUCTURED_REPLY, p.REP_ERR_INVALID),
        (p.OPT_STRUCTURED_REPLY, p.REP_ACK),
        (p.OPT_ABORT, p.REP_ACK),
    ]
    assert replies[0][2] == struct.pack(">I", 4) + b"disk"
    assert conn.structured_replies
    conn.receive_data(b"more")  # after abort: ignored
    assert conn.next_event() is p.NEED_DATA


def test_meta_contexts():
    conn = new_conn()
    conn.data_to_send()
    data = (
        client_flags()
        + opt(p.OPT_SET_META_CONTEXT, meta_data("", (p.BASE_ALLOCATION,)))  # before structured
        + opt(p.OPT_STRUCTURED_REPLY)
        + opt(p.OPT_LIST_META_CONTEXT, meta_data("disk"))
        + opt(p.OPT_LIST_META_CONTEXT, meta_data("", ("base:",)))
        + opt(p.OPT_LIST_META_CONTEXT, meta_data("", ("qemu:dirty-bitmap:x",)))
        + opt(p.OPT_SET_META_CONTEXT, meta_data("", ("x-other:thing", p.BASE_ALLOCATION)))
        + opt(p.OPT_SET_META_CONTEXT, meta_data("nope", (p.BASE_ALLOCATION,)))
        + opt(p.OPT_SET_META_CONTEXT, meta_data("", (p.BASE_ALLOCATION,))[:-3])  # truncated
    )
    feed(conn, data)
    r = [(o, t, d) for o, t, d in parse_option_replies(conn.data_to_send())]
    kinds = [(o, t) for o, t, _ in r]
    assert kinds == [
        (p.OPT_SET_META_CONTEXT, p.REP_ERR_INVALID),
        (p.OPT_STRUCTURED_REPLY, p.REP_ACK),
        (p.OPT_LIST_META_CONTEXT, p.REP_META_CONTEXT),
        (p.OPT_LIST_META_CONTEXT, p.REP_ACK),
        (p.OPT_LIST_META_CONTEXT, p.REP_META_CONTEXT),
        (p.OPT_LIST_META_CONTEXT, p.REP_ACK),
        (p.OPT_LIST_META_CONTEXT, p.REP_ACK),
        (p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT),
        (p.OPT_SET_META_CONTEXT, p.REP_ACK),
        (p.OPT_SET_META_CONTEXT, p.REP_ERR_UNKNOWN),
        (p.OPT_SET_META_CONTEXT, p.REP_ERR_INVALID),
    ]
    assert r[2][2] == struct.pack(">I", 0) + b"base:allocation"
    assert r[7][2] == struct.pack(">I", p.BASE_ALLOCATION_ID) + b"base:allocation"
    assert conn.meta_contexts == ()  # the last SET failed: the selection is replaced by nothing
    feed(conn, opt(p.OPT_SET_META_CONTEXT, meta_data("disk", (p.BASE_ALLOCATION,))) + opt(p.OPT_GO, go_data()))
    assert conn.meta_contexts == (p.BASE_ALLOCATION,)


@pytest.mark.parametrize("mode", FEED_MODES)
def test_oversize_option_is_skipped_unbuffered(mode):
    conn = new_conn()
    conn.data_to_send()
    n = p.MAX_OPTION_LENGTH + 1000
    data = client_flags() + opt(77, b"\xaa" * n) + opt(p.OPT_LIST)
    if mode == "bytewise":
        feed(conn, data[:40])
        for i in range(40, len(data), 997):  # chunky, for speed; still split mid-everything
            conn.receive_data(data[i : i + 997])
            assert conn.buffered < 2000
            while conn.next_event() is not p.NEED_DATA:
                pass
    else:
        feed(conn, data, mode)
    kinds = [(o, t) for o, t, _ in parse_option_replies(conn.data_to_send())]
    assert kinds == [(77, p.REP_ERR_TOO_BIG), (p.OPT_LIST, p.REP_SERVER), (p.OPT_LIST, p.REP_ACK)]


@pytest.mark.parametrize(
    "data, match",
    [
        (client_flags(1 << 5), "unknown client flags"),
        (client_flags() + struct.pack(">QII", 0x1234, 7, 0), "bad option magic"),
    ],
)
def test_fatal_handshake_garbage(data, match):
    conn = new_conn()
    conn.receive_data(data)
    with pytest.raises(p.ProtocolError, match=match):
        conn.next_event()


def test_too_many_options_is_fatal():
    conn = new_conn()
    conn.receive_data(client_flags() + opt(p.OPT_LIST) * p.MAX_OPTIONS)
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(opt(p.OPT_LIST))
    with pytest.raises(p.ProtocolError, match="options"):
        conn.next_event()


def test_eof_mid_handshake_is_an_error_but_clean_eof_in_transmission_is_not():
    conn = new_conn()
    conn.receive_data(client_flags()[:2])
    conn.receive_data(b"")
    with pytest.raises(p.ProtocolError, match="closed"):
        conn.next_event()
    conn = new_conn()
    to_transmission(conn)
    conn.receive_data(b"")
    assert conn.next_event() is p.NEED_DATA
    conn = new_conn()
    to_transmission(conn)
    conn.receive_data(req(p.CMD_READ, 0, 512)[:10])
    conn.receive_data(b"")
    with pytest.raises(p.ProtocolError):
        conn.next_event()


def test_export_validation():
    with pytest.raises(p.LocalProtocolError):
        p.ServerConnection(p.Export(size=-1))
    with pytest.raises(p.LocalProtocolError):
        p.ServerConnection(p.Export(size=1, name="x" * 5000))
    conn = new_conn()
    with pytest.raises(p.LocalProtocolError):
        conn.reply_ok(1)


# --- transmission -------------------------------------------------------------------


@pytest.mark.parametrize("mode", FEED_MODES)
def test_pipelined_requests(mode):
    conn = new_conn()
    to_transmission(conn)
    payload = bytes(range(256)) * 8
    data = (
        req(p.CMD_READ, 4096, 512, cookie=1)
        + req(p.CMD_WRITE, 512, len(payload), cookie=2, flags=p.CMD_FLAG_FUA, payload=payload)
        + req(p.CMD_FLUSH, cookie=3)
        + req(p.CMD_TRIM, 0, 4096, cookie=4)
        + req(p.CMD_WRITE_ZEROES, 0, 8192, cookie=5, flags=p.CMD_FLAG_NO_HOLE)
        + req(p.CMD_BLOCK_STATUS, 0, SIZE, cookie=6, flags=p.CMD_FLAG_REQ_ONE)
        + req(p.CMD_CACHE, 0, 65536, cookie=7)
        + req(p.CMD_READ, 0, 65536, cookie=8, flags=p.CMD_FLAG_DF)
        + req(p.CMD_DISC)
    )
    events = feed(conn, data, mode)
    assert [type(e) for e in events] == [p.Request] * 8 + [p.Disconnect]
    reqs = events[:8]
    assert [(r.command, r.cookie, r.error) for r in reqs] == [
        (p.CMD_READ, 1, 0),
        (p.CMD_WRITE, 2, 0),
        (p.CMD_FLUSH, 3, 0),
        (p.CMD_TRIM, 4, 0),
        (p.CMD_WRITE_ZEROES, 5, 0),
        (p.CMD_BLOCK_STATUS, 6, 0),
        (p.CMD_CACHE, 7, 0),
        (p.CMD_READ, 8, 0),
    ]
    assert reqs[1].data == payload and reqs[1].fua and reqs[1].offset == 512
    assert reqs[0].name == "READ" and reqs[0].data is None
    assert conn.state is p.State.CLOSED


def _one(conn, data, mode="whole"):
    events = feed(conn, data, mode)
    assert len(events) == 1
    return events[0]


@pytest.mark.parametrize(
    "request_bytes, err, read_only, structured",
    [
        (req(p.CMD_READ, SIZE - 512, 1024), p.EINVAL, False, True),
        (req(p.CMD_READ, 0, p.MAX_BLOCK_SIZE + 512), p.EINVAL, False, True),
        (req(p.CMD_READ, 0, 0), p.EINVAL, False, True),
        (req(p.CMD_READ, 2**64 - 512, 1024), p.EINVAL, False, True),  # offset+length overflow
        (req(p.CMD_READ, 0, 512, flags=p.CMD_FLAG_DF), p.EINVAL, False, False),  # DF unnegotiated
        (req(p.CMD_READ, 0, 512, flags=1 << 9), p.EINVAL, False, True),  # unknown flag
        (req(p.CMD_READ, 0, 512, flags=p.CMD_FLAG_FUA), p.EINVAL, True, True),  # FUA unadvertised
        (req(p.CMD_WRITE, SIZE, 512, payload=b"x" * 512), p.ENOSPC, False, True),
        (req(p.CMD_WRITE, 0, 512, payload=b"x" * 512), p.EPERM, True, True),
        (req(p.CMD_TRIM, 0, 512), p.EPERM, True, True),
        (req(p.CMD_WRITE_ZEROES, 0, 512), p.EPERM, True, True),
        (req(p.CMD_WRITE_ZEROES, SIZE, 512), p.ENOSPC, False, True),
        (req(p.CMD_TRIM, SIZE - 1, 2), p.EINVAL, False, True),
        (req(p.CMD_BLOCK_STATUS, 0, 512), p.EINVAL, False, False),  # no meta context
        (req(p.CMD_BLOCK_STATUS, 0, SIZE + 1), p.EINVAL, False, True),
        (req(p.CMD_CACHE, 0, p.MAX_BLOCK_SIZE + 1), p.EINVAL, False, True),
        (req(42, 0, 512), p.EINVAL, False, True),  # unknown command
        (req(p.CMD_FLUSH, 0, 0, flags=p.CMD_FLAG_REQ_ONE), p.EINVAL, False, True),
    ],
)
@pytest.mark.parametrize("mode", FEED_MODES)
def test_hostile_requests_get_errors_and_connection_survives(request_bytes, err, read_only, structured, mode):
    conn = new_conn(read_only=read_only)
    to_transmission(conn, structured=structured, meta=structured)
    ev = _one(conn, request_bytes, mode)
    assert isinstance(ev, p.Request) and ev.error == err and ev.message
    assert ev.data is None
    ev = _one(conn, req(p.CMD_READ, 0, 512, cookie=99), mode)  # still in sync
    assert ev.error == 0 and ev.cookie == 99


@pytest.mark.parametrize("mode", ["whole", "chunked", "trailing"])
def test_oversize_write_payload_is_consumed_unbuffered(mode):
    conn = new_conn(size=1 << 40)
    to_transmission(conn)
    n = p.MAX_BLOCK_SIZE + 4096
    header = req(p.CMD_WRITE, 0, n, cookie=5)
    follow = req(p.CMD_FLUSH, cookie=6)
    conn.receive_data(header)
    assert conn.next_event() is p.NEED_DATA
    chunk = b"\0" * (1 << 20)
    sent = 0
    events = []
    while sent < n:
        k = min(len(chunk), n - sent)
        piece = chunk[:k]
        if sent + k == n and mode == "trailing":
            piece += follow
        conn.receive_data(piece)
        sent += k
        assert conn.buffered <= len(follow)  # never buffers the payload
        while (ev := conn.next_event()) is not p.NEED_DATA:
            events.append(ev)
    if mode != "trailing":
        events += feed(conn, follow)
    assert [(e.cookie, e.error) for e in events] == [(5, p.EINVAL), (6, 0)]


def test_max_size_write_is_accepted():
    conn = new_conn(size=1 << 30)
    to_transmission(conn)
    payload = b"\x5a" * p.MAX_BLOCK_SIZE
    ev = _one(conn, req(p.CMD_WRITE, 0, len(payload), payload=payload))
    assert ev.error == 0 and len(ev.data) == p.MAX_BLOCK_SIZE


def test_bad_request_magic_is_fatal():
    conn = new_conn()
    to_transmission(conn)
    conn.receive_data(b"\x00" * 28)
    with pytest.raises(p.ProtocolError, match="magic"):
        conn.next_event()
    assert conn.state is p.State.ERROR


def test_flush_and_disc_ignore_offset_length():
    conn = new_conn()
    to_transmission(conn)
    ev = _one(conn, req(p.CMD_FLUSH, 5, 5))
    assert ev.error == 0
    assert _one(conn, req(p.CMD_DISC, 1, 1)) == p.Disconnect("NBD_CMD_DISC")


# --- replies ------------------------------------------------------------------------


def test_simple_replies():
    conn = new_conn()
    to_transmission(conn, structured=False, meta=False)
    out = conn.reply_read(0x1122, 0, b"abc")
    assert out[0] == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 0x1122) and out[1] == b"abc"
    assert conn.reply_ok(9) == [struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 9)]
    assert conn.reply_error(9, errno.EROFS, "ro") == [struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.EPERM, 9)]
    with pytest.raises(p.LocalProtocolError):
        conn.reply_block_status(1, [(512, 0)])


def parse_chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
        assert magic == p.STRUCTURED_REPLY_MAGIC
        pos += 20
        out.append((flags, rtype, cookie, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def test_structured_replies():
    conn = new_conn()
    to_transmission(conn)
    data = bytes(range(256)) * 64  # 16 KiB at offset 8192
    chunks = parse_chunks(b"".join(bytes(b) for b in conn.reply_read(3, 8192, data)))
    assert chunks == [(p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 3, struct.pack(">Q", 8192) + data)]
    holes = [(8192, 4096), (8192 + 12288, 4096)]
    chunks = parse_chunks(b"".join(bytes(b) for b in conn.reply_read(3, 8192, data, holes)))
    assert [(c[0], c[1]) for c in chunks] == [
        (0, p.REPLY_TYPE_OFFSET_HOLE),
        (0, p.REPLY_TYPE_OFFSET_DATA),
        (p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_HOLE),
    ]
    assert chunks[0][3] == struct.pack(">QI", 8192, 4096)
    assert chunks[1][3] == struct.pack(">Q", 8192 + 4096) + data[4096:12288]
    assert chunks[2][3] == struct.pack(">QI", 8192 + 12288, 4096)
    with pytest.raises(p.LocalProtocolError):
        conn.reply_read(3, 8192, data, [(0, 4096)])
    assert parse_chunks(conn.reply_ok(4)[0]) == [(p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, 4, b"")]
    err = parse_chunks(conn.reply_error(5, errno.EDQUOT, "full")[0])
    assert err == [(p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, 5, struct.pack(">IH", p.ENOSPC, 4) + b"full")]
    bs = parse_chunks(conn.reply_block_status(6, [(4096, 0), (8192, 3)])[0])
    assert bs == [(1, p.REPLY_TYPE_BLOCK_STATUS, 6, struct.pack(">IIIII", 1, 4096, 0, 8192, 3))]
    bs = parse_chunks(conn.reply_block_status(6, [(4096, 0), (8192, 3)], req_one=True)[0])
    assert bs[0][3] == struct.pack(">III", 1, 4096, 0)
    with pytest.raises(p.LocalProtocolError):
        conn.reply_block_status(6, [])
    many = parse_chunks(conn.reply_block_status(7, [(512, i % 2 * 3) for i in range(10000)])[0])
    assert len(many[0][3]) == 4 + 8 * p.MAX_DESCRIPTORS  # fewer than asked: allowed


def test_allocation_descriptors():
    ext = [Extent(0, 4096, "data"), Extent(4096, 4096, "hole"), Extent(8192, 4096, "zero"), Extent(16384, 4096, "data")]
    assert p.allocation_descriptors(ext, 0, 20480) == [(4096, 0), (8192, 3), (8192, 0)]  # gap counts as data
    assert p.allocation_descriptors(ext, 2048, 4096) == [(2048, 0), (2048, 3)]  # clipped
    assert p.allocation_descriptors([], 0, 512) == [(512, 0)]
    assert p.allocation_descriptors([Extent(0, 1 << 30, "hole")], 512, 1024) == [(1024, 3)]


def test_wire_errno():
    assert p.wire_errno(errno.EIO) == p.EIO
    assert p.wire_errno(errno.EROFS) == p.EPERM
    assert p.wire_errno(errno.EFBIG) == p.ENOSPC
    assert p.wire_errno(errno.ENOENT) == p.EIO
    assert p.wire_errno(None) == p.EIO
    assert p.wire_errno(errno.EOPNOTSUPP) == p.ENOTSUP
