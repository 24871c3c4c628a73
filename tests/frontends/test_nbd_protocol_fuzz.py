"""Fuzz invariant: whatever the peer sends, the parser yields events or raises ProtocolError, nothing else."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.frontends.nbd import protocol as p

from .test_nbd_protocol import client_flags, go_data, meta_data, opt, req

SIZE = 1 << 20


def run(chunks: list[bytes], *, read_only: bool = False, eof: bool = False) -> None:
    conn = p.ServerConnection(p.Export(size=SIZE, name="disk", read_only=read_only))
    conn.data_to_send()
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not p.NEED_DATA:
                assert isinstance(ev, (p.Ready, p.Request, p.Disconnect))
                if isinstance(ev, p.Request):
                    if ev.error:
                        assert ev.error in (p.EINVAL, p.EPERM, p.ENOSPC)
                        out = conn.reply_error(ev.cookie, ev.error, ev.message)
                    else:
                        if ev.command != p.CMD_FLUSH:  # FLUSH ignores offset/length
                            assert ev.offset + ev.length <= SIZE and ev.length > 0
                            assert ev.length <= p.MAX_BLOCK_SIZE or ev.command in (
                                p.CMD_TRIM,
                                p.CMD_WRITE_ZEROES,
                                p.CMD_BLOCK_STATUS,
                            )
                        if ev.command == p.CMD_WRITE:
                            assert len(ev.data) == ev.length and not read_only
                        out = conn.reply_ok(ev.cookie)
                    assert out
                assert conn.buffered <= 2 * p.MAX_OPTION_LENGTH + len(chunk)
            conn.data_to_send()
        if eof:
            conn.receive_data(b"")
            while conn.next_event() is not p.NEED_DATA:
                pass
    except p.ProtocolError:
        assert conn.state is p.State.ERROR


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in points:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return [c for c in out if c]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=8), st.booleans(), st.booleans())
def test_raw_garbage(chunks, read_only, eof):
    run(chunks, read_only=read_only, eof=eof)


options = st.one_of(
    st.builds(lambda o, d: opt(o, d), st.integers(0, 20), st.binary(max_size=64)),
    st.builds(lambda n, i: opt(p.OPT_GO, go_data(n, tuple(i))), st.sampled_from(["", "disk", "x"]), st.lists(st.integers(0, 5), max_size=4)),
    st.builds(lambda n, i: opt(p.OPT_INFO, go_data(n, tuple(i))), st.sampled_from(["", "disk"]), st.lists(st.integers(0, 5), max_size=4)),
    st.builds(
        lambda o, n, q: opt(o, meta_data(n, tuple(q))),
        st.sampled_from([p.OPT_SET_META_CONTEXT, p.OPT_LIST_META_CONTEXT]),
        st.sampled_from(["", "disk", "zz"]),
        st.lists(st.sampled_from(["base:allocation", "base:", "x:y", ""]), max_size=3),
    ),
    st.just(opt(p.OPT_STRUCTURED_REPLY)),
    st.just(opt(p.OPT_EXPORT_NAME, b"disk")),
    st.builds(lambda b: struct.pack(">QII", p.IHAVEOPT, 6, b), st.integers(0, 2**32 - 1)),
)

requests = st.builds(
    lambda cmd, flags, off, length, payload: req(cmd, off, length, flags=flags, payload=payload),
    st.integers(0, 9),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 4, 8]),
    st.integers(0, 2**64 - 1) | st.integers(0, SIZE),
    st.integers(0, 2**32 - 1) | st.integers(0, 8192),
    st.binary(max_size=64),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(options, max_size=6),
    st.lists(requests, max_size=6),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.booleans(),
    st.booleans(),
)
def test_structured_fuzz(opts, reqs, cuts, read_only, eof):
    data = client_flags() + b"".join(opts) + opt(p.OPT_GO, go_data()) + b"".join(reqs)
    run(split(data, cuts), read_only=read_only, eof=eof)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(0, 400))
def test_bitflip_after_valid_prefix(noise, at):
    data = bytearray(client_flags() + opt(p.OPT_STRUCTURED_REPLY) + opt(p.OPT_GO, go_data()) + req(p.CMD_READ, 0, 512))
    pos = at % len(data)
    data[pos : pos + len(noise)] = noise
    run([bytes(data)])
