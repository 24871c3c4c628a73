"""The bench link emulator: DelayLine arithmetic (no privileges) and the real rig (root + TUN).

The rig tests bring up two private namespaces joined only by the userspace line, then check
behaviour: a TCP echo takes at least 2D and not wildly more, a bulk transfer arrives intact,
and cannot beat the rate cap. Upper time bounds are generous sanity limits only (the box is
shared), lower bounds are physics and therefore strict.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import statistics
import threading
import time

import pytest

from bench import netns
from bench.linkemu import VNET_HDR_LEN, DelayLine, LinkParams, LinkRig, wire_bytes

# ---------------------------------------------------------------------------------------------
# DelayLine: pure arithmetic


def test_uncapped_line_only_delays():
    line = DelayLine(0.1, 0, 1000)
    assert line.offer(5.0, 10**9) == pytest.approx(5.1)
    assert line.offer(5.0, 10**9) == pytest.approx(5.1)  # no serialisation without a cap


def test_capped_line_serialises_fifo_then_delays():
    line = DelayLine(0.1, 1000.0, 10_000)  # 1000 B/s
    assert line.offer(0.0, 500) == pytest.approx(0.6)  # 0.5 s on the wire + 0.1 s
    assert line.offer(0.0, 500) == pytest.approx(1.1)  # queued behind the first
    assert line.offer(3.0, 100) == pytest.approx(3.2)  # idle line: starts at once


def test_drop_tail_when_backlog_exceeds_queue():
    line = DelayLine(0.0, 1000.0, 1000)
    assert line.offer(0.0, 600) is not None
    assert line.offer(0.0, 600) is None  # 600 queued + 600 > 1000
    assert line.offer(0.0, 400) is not None  # exactly fills the queue
    assert line.dropped_frames == 1 and line.dropped_bytes == 600
    assert line.offer(0.5, 500) is not None  # half drained by then


def _frame(payload: int, gso_size: int) -> bytes:
    vnet = bytes([0x01, 1 if gso_size else 0, 0, 0]) + gso_size.to_bytes(2, "little") + bytes(4)
    ip = bytes([0x45, 0]) + bytes(7) + bytes([6]) + bytes(10)  # IPv4, IHL 5, proto TCP
    tcp = bytes(12) + bytes([0x80]) + bytes(19)  # data offset 8 words = 32 bytes
    return vnet + ip + tcp + bytes(payload)


def test_wire_bytes_charges_per_segment_headers():
    f = _frame(1448 * 10, 1448)
    assert len(f) - VNET_HDR_LEN == 52 + 14480
    assert wire_bytes(f) == 52 + 14480 + 9 * 52
    assert wire_bytes(f, per_segment_headers=False) == 52 + 14480
    assert wire_bytes(_frame(100, 0)) == 152  # not GSO
    assert wire_bytes(_frame(1000, 1448)) == 1052  # GSO flag but one segment


# ---------------------------------------------------------------------------------------------
# the real rig

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2",
)

RTT_MS = 100.0
RATE_MBPS = 20.0


@pytest.fixture(scope="module")
def rig():
    prefix = f"obt{os.getpid() % 100000}"
    with LinkRig(LinkParams(rtt_ms=RTT_MS, rate_MBps=RATE_MBPS, queue_bytes=6_000_000, prefix=prefix)) as r:
        yield r
    assert not netns.exists(f"{prefix}-reg") and not netns.exists(f"{prefix}-cli")


def _listener(rig: LinkRig) -> socket.socket:
    with netns.entered(rig.p.reg_ns):
        srv = socket.socket()
        srv.bind((rig.p.server_addr, 0))
    srv.listen(1)
    return srv


def _client(rig: LinkRig) -> socket.socket:
    with netns.entered(rig.p.cli_ns):
        return socket.socket()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


@needs_root
def test_rig_reports_declared_parameters(rig):
    assert rig.info["rtt_ms"] == RTT_MS and rig.info["rate_MBps"] == RATE_MBPS
    assert rig.info["sysctl"]["registry"]["net.ipv4.tcp_wmem"] == rig.p.server_wmem
    assert rig.info["sysctl"]["registry"]["net.ipv4.tcp_no_metrics_save"] == "1"


@needs_root
def test_rtt_is_twice_the_one_way_delay(rig):
    srv = _listener(rig)
    port = srv.getsockname()[1]

    def echo():
        c, _ = srv.accept()
        with c:
            while data := c.recv(64):
                c.sendall(data)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    cli = _client(rig)
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    cli.connect((rig.p.server_addr, port))
    connect_ms = (time.monotonic() - t0) * 1000
    rtts = []
    with cli:
        for i in range(8):
            t0 = time.monotonic()
            cli.sendall(b"x")
            assert _recv_exact(cli, 1) == b"x"
            rtts.append((time.monotonic() - t0) * 1000)
    t.join(5)
    srv.close()
    median = statistics.median(rtts[1:])
    # physics: nothing comes back faster than 2D; generous upper bound for a busy box
    assert RTT_MS - 1 <= connect_ms <= RTT_MS + 100
    assert min(rtts) >= RTT_MS - 1
    assert median <= RTT_MS + 50


@needs_root
def test_bulk_bytes_arrive_intact_and_respect_the_cap(rig):
    size = 6 << 20
    payload = os.urandom(size)
    srv = _listener(rig)
    port = srv.getsockname()[1]

    def send():
        c, _ = srv.accept()
        with c:
            c.sendall(payload)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    before = rig.stats()["s2c"]["delivered_bytes"]
    cli = _client(rig)
    t0 = time.monotonic()
    cli.connect((rig.p.server_addr, port))
    with cli:
        got = _recv_exact(cli, size)
        assert cli.recv(1) == b""
    elapsed = time.monotonic() - t0
    t.join(5)
    srv.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    # cannot beat the cap; generous upper bound (single stream, slow start, shared CPU)
    assert elapsed >= size / (RATE_MBPS * 1e6)
    assert elapsed < 60
    time.sleep(0.3)  # let the line publish its counters
    st = rig.stats()["s2c"]
    assert st["delivered_bytes"] - before >= size
    assert st["write_errors"] == 0
    tun = rig.tun_stats()
    assert tun["registry"]["tx_dropped"] == 0 and tun["client"]["tx_dropped"] == 0


@needs_root
def test_drop_tail_loses_frames_but_tcp_recovers():
    prefix = f"obq{os.getpid() % 100000}"
    size = 4 << 20
    payload = os.urandom(size)
    # queue of ~1.5 full-size GSO frames at 10 MB/s: a bulk stream must overflow it
    with LinkRig(LinkParams(rtt_ms=40, rate_MBps=10, queue_bytes=100_000, prefix=prefix)) as rig:
        srv = _listener(rig)
        port = srv.getsockname()[1]

        def send():
            c, _ = srv.accept()
            with c:
                c.sendall(payload)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        cli = _client(rig)
        cli.settimeout(60)
        cli.connect((rig.p.server_addr, port))
        with cli:
            got = _recv_exact(cli, size)
        t.join(5)
        srv.close()
        time.sleep(0.3)
        st = rig.stats()["s2c"]
    assert got == payload
    assert st["dropped_frames"] > 0
    assert st["max_backlog_bytes"] <= 100_000
    assert not netns.exists(f"{prefix}-reg")
