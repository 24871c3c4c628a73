"""Preconnector (TCP handshakes started before the HTTP client exists), the endpoint order it
relies on, and its proxy rule. Real kernel sockets on loopback and the real docker-registry."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import random
import socket

import pytest

from tcmu_obd.config import GlobalConfig, Mirror, P2PConfig
from tcmu_obd.remote.endpoints import endpoints
from tcmu_obd.remote.preconnect import Preconnector
from tests.remote.helpers import client
from tests.support.registry import push_blob, registry  # noqa: F401  (fixture)

BLOB = random.Random(11).randbytes(2 * 1024 * 1024 + 99)


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(10)
    yield srv
    srv.close()


def _info(addr):
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", addr)


def _started(port: int, count: int, path: str = "") -> Preconnector:
    pre = Preconnector(f"http://127.0.0.1:{port}{path}", count).start()
    assert pre.wait(10)
    return pre


def _assert_unconnected(sock: socket.socket) -> None:
    """A fresh socket from the factory, not an early (or failed) one; closed here."""
    with pytest.raises(OSError) as e:
        sock.getpeername()
    assert e.value.errno == errno.ENOTCONN
    sock.close()


def test_connections_are_open_before_anyone_asks_for_them(listener):
    addr = listener.getsockname()
    pre = _started(addr[1], 3, "/v2/x/blobs/d")
    assert pre.opened == 3 and pre.error is None
    accepted = [listener.accept()[0] for _ in range(3)]  # the handshakes happened with no client
    taken = [pre.socket_factory(_info(addr)) for _ in range(3)]
    assert all(s.getpeername() == addr for s in taken)
    assert {s.getsockname() for s in taken} == {a.getpeername() for a in accepted}
    _assert_unconnected(pre.socket_factory(_info(addr)))  # none left: a new socket
    assert (pre.taken, pre.discarded) == (3, 0)
    for s in (*taken, *accepted):
        s.close()
    pre.close()


def test_connect_on_an_early_socket_is_a_no_op_when_done(listener):
    addr = listener.getsockname()
    pre = _started(addr[1], 1)
    conn, _ = listener.accept()
    sock = pre.socket_factory(_info(addr))
    sock.setblocking(True)
    sock.connect(addr)  # what asyncio's sock_connect does with the socket it is given
    sock.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    sock.close()
    conn.close()
    pre.close()


def test_refused_connects_are_never_handed_out():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    pre = _started(port, 4)
    # loopback may refuse at once (nothing opened, error says why) or after the fact
    assert pre.opened == 4 or ("ECONNREFUSED" in (pre.error or "") and pre.opened == 0)
    _assert_unconnected(pre.socket_factory(_info(("127.0.0.1", port))))  # not a failed one
    assert pre.taken == 0 and pre.discarded == pre.opened
    pre.close()


def test_other_addresses_get_fresh_sockets_and_close_shuts_the_rest(listener):
    addr = listener.getsockname()
    pre = _started(addr[1], 2)
    accepted = [listener.accept()[0] for _ in range(2)]
    _assert_unconnected(pre.socket_factory(_info(("127.0.0.1", addr[1] + 1))))
    pre.close()  # nobody took them: both are closed, the server sees the end of each stream
    for a in accepted:
        a.settimeout(10)
        assert a.recv(1) == b""
        a.close()
    _assert_unconnected(pre.socket_factory(_info(addr)))  # after close: fresh ones


def test_not_an_http_url_is_refused():
    with pytest.raises(ValueError, match="not an http"):
        Preconnector("unix:///run/x.sock", 1)


@pytest.mark.registry
async def test_registry_reads_ride_the_early_connections(registry):  # noqa: F811
    digest = push_blob(registry.url, "pre/conn", BLOB)
    url = registry.blob_url("pre/conn", digest)
    pre = Preconnector(url, 4).start()
    assert pre.wait(10) and pre.opened == 4
    async with client() as c:
        c.socket_factory = pre.socket_factory
        out = bytearray(len(BLOB))
        step = -(-len(BLOB) // 4)
        await asyncio.gather(*(c.read_range_into(url, off, memoryview(out)[off:off + step])
                               for off in range(0, len(BLOB), step)))
    pre.close()
    assert hashlib.sha256(out).hexdigest() == digest.split(":")[1]
    assert (pre.taken, pre.discarded) == (4, 0)


def test_endpoint_order_and_the_host_connected_to():
    blob = "https://origin.example/v2/r/blobs/sha256:ab"
    gc = GlobalConfig(mirrors=(Mirror(url="http://m1:5000"), Mirror(url="https://m2/prefix/")),
                      p2p_config=P2PConfig(enable=True, address="http://p2p:65001"))
    eps = endpoints(gc, blob)
    assert [e.connect_url for e in eps] == [
        "http://m1:5000/v2/r/blobs/sha256:ab",
        "https://m2/prefix/v2/r/blobs/sha256:ab",
        "http://p2p:65001/",
        blob,
    ]
    assert [e.penalty_key for e in eps] == ["http://m1:5000", "https://m2/prefix/", "http://p2p:65001", None]
    skipped = endpoints(gc, blob, lambda key: key != "https://m2/prefix/")
    assert [e.url for e in skipped] == ["https://m2/prefix/v2/r/blobs/sha256:ab", blob]  # origin never skipped
    assert endpoints(GlobalConfig(), blob) == [(blob, None, None)]


def test_a_host_name_is_resolved_and_connected_off_the_caller():
    family, type_, proto, _, where = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, type_, proto) as srv:  # the address the name resolves to first
        srv.bind(where)
        srv.listen(4)
        srv.settimeout(10)
        port = srv.getsockname()[1]
        pre = Preconnector(f"http://localhost:{port}/v2/x", 2).start()
        assert pre.wait(10) and pre.error is None and pre.opened == 2
        accepted = [srv.accept()[0] for _ in range(2)]
        taken = pre.socket_factory((family, type_, proto, "", srv.getsockname()))
        assert taken.getpeername()[:2] == srv.getsockname()[:2]
        for s in (taken, *accepted):
            s.close()
        pre.close()


def test_a_name_that_does_not_resolve_says_so():
    pre = Preconnector("http://no-such-host.invalid:5000/v2/x", 2).start()
    assert pre.wait(30)
    assert pre.opened == 0 and "resolving no-such-host.invalid" in pre.error
    pre.close()
