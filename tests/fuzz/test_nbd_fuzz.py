"""NBD: a damaged client session (handshake, options, requests) ends in a refused request
or ProtocolError, never another exception, and never by way of the parser's defensive
catch-all (a ProtocolError caused by struct.error/IndexError/... is a crash in disguise).
Seed: a complete, valid session: flags, structured replies, meta context, GO, then READ,
WRITE, TRIM, BLOCK_STATUS, FLUSH and DISC."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tcmu_obd.frontends.nbd import protocol as p
from tests.frontends.test_nbd_protocol import client_flags, go_data, meta_data, opt, req

from .mutate import Seed, allocation_limit, be, fuzz_settings, mutants

SIZE = 1 << 20


def _session() -> tuple[bytes, list, list]:
    parts, fields, hot = [], [], []
    pos = 0

    def add(data: bytes, data_fields=()):
        nonlocal pos
        for off, width in data_fields:
            fields.append(be(pos + off, width))
        hot.append((pos, pos + min(len(data), 32)))
        parts.append(data)
        pos += len(data)

    add(client_flags(), [(0, 4)])
    add(opt(p.OPT_STRUCTURED_REPLY), [(8, 4), (12, 4)])
    add(opt(p.OPT_SET_META_CONTEXT, meta_data("disk", ("base:allocation",))), [(12, 4), (16, 4), (24, 4), (28, 4)])
    add(opt(p.OPT_INFO, go_data("disk", (p.INFO_BLOCK_SIZE,))), [(12, 4), (16, 4), (24, 2)])
    add(opt(p.OPT_GO, go_data("disk")), [(12, 4), (16, 4)])
    request = [(4, 2), (6, 2), (16, 8), (24, 4)]  # flags, type, offset, length
    add(req(p.CMD_READ, 4096, 512), request)
    add(req(p.CMD_WRITE, 0, 16, payload=bytes(range(16))), request)
    add(req(p.CMD_TRIM, 8192, 4096), request)
    add(req(p.CMD_BLOCK_STATUS, 0, 65536), request)
    add(req(p.CMD_WRITE_ZEROES, 0, 1024, flags=p.CMD_FLAG_FUA), request)
    add(req(p.CMD_FLUSH), request)
    add(req(p.CMD_DISC), request)
    return b"".join(parts), fields, hot


SEED, FIELDS, HOT = _session()


def drive(chunks: list[bytes], read_only: bool) -> None:
    conn = p.ServerConnection(p.Export(size=SIZE, name="disk", read_only=read_only))
    conn.data_to_send()
    try:
        for chunk in chunks + [b""]:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not p.NEED_DATA:
                assert isinstance(ev, (p.Ready, p.Request, p.Disconnect))
                if isinstance(ev, p.Request):
                    if ev.error:
                        conn.reply_error(ev.cookie, ev.error, ev.message)
                        continue
                    if ev.command not in (p.CMD_FLUSH, p.CMD_DISC):
                        assert 0 < ev.length and ev.offset + ev.length <= SIZE
                    if ev.command == p.CMD_WRITE:
                        assert len(ev.data) == ev.length <= p.MAX_BLOCK_SIZE and not read_only
                    if ev.command == p.CMD_READ:
                        assert conn.reply_read(ev.cookie, ev.offset, bytes(ev.length))
                    else:
                        assert conn.reply_ok(ev.cookie)
            # nothing is buffered beyond one message plus what this chunk brought
            assert conn.buffered <= 2 * p.MAX_OPTION_LENGTH + len(chunk) + 64
            conn.data_to_send()
    except p.ProtocolError as e:
        assert conn.state is p.State.ERROR
        assert not isinstance(e.__cause__, (struct.error, IndexError, ValueError, UnicodeDecodeError)), \
            f"parser crash caught by the catch-all: {e.__cause__!r}"


@st.composite
def cuts(draw, data: bytes) -> list[bytes]:
    points = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    out, last = [], 0
    for c in points + [len(data)]:
        if c > last:
            out.append(data[last:c])
            last = c
    return out


@fuzz_settings(250)
@given(st.data(), mutants([Seed(SEED, FIELDS, HOT)]), st.booleans())
def test_damaged_session(data, case, read_only):
    _, stream = case
    drive(data.draw(cuts(stream)), read_only)


def test_claimed_lengths_are_not_allocated():
    """An option claiming 4 GiB of data and a WRITE claiming 4 GiB of payload: the server
    skips or refuses them; memory stays far below the claims."""
    conn = p.ServerConnection(p.Export(size=1 << 40, name="disk"))
    conn.data_to_send()
    with allocation_limit(1 << 20):
        conn.receive_data(client_flags() + struct.pack(">QII", p.IHAVEOPT, p.OPT_INFO, 0xFFFFFFFF) + bytes(4096))
        assert conn.next_event() is p.NEED_DATA
    conn = p.ServerConnection(p.Export(size=1 << 40, name="disk"))
    conn.receive_data(client_flags() + opt(p.OPT_GO, go_data("disk")))
    assert isinstance(conn.next_event(), p.Ready)
    with allocation_limit(1 << 20):
        conn.receive_data(req(p.CMD_WRITE, 0, 0xFFFFFFFF) + bytes(65536))
        assert conn.next_event() is p.NEED_DATA  # the payload is being skipped, not stored
