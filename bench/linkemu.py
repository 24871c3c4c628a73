"""A long, capped network link between two network namespaces, emulated in userspace.

Theory of operation
-------------------
Two namespaces are created: the *registry* side (default `obd-reg`) and the *client* side
(default `obd-cli`). Each gets one TUN device and nothing else but loopback, so the only way
out of either namespace is the TUN, and every TUN frame ends up in this process:

    obd-cli: 10.200.0.1 ── TUN obd-tc ═╗            ╔═ TUN obd-tr ── 10.200.0.2 :obd-reg
                                       ╚═ this line ╝

The line reads each IP packet from one TUN, holds it, and writes it into the other TUN. Both
ends therefore run the real kernel TCP stack (handshake, slow start, autotuning, socket-buffer
limits, congestion control, loss recovery); only the wire is emulated. Per direction:

* **Rate cap, FIFO, drop-tail.** A frame arriving at t starts serialising at
  `start = max(t, busy_until)`; if the bytes already queued ahead of it, `(start - t) * rate`,
  plus its own length exceed `queue_bytes`, it is dropped; otherwise
  `busy_until = start + len / rate`.
* **Propagation delay.** The frame is delivered at `busy_until + D` where `D = rtt / 2`.
  With no cap (rate 0) it is delivered at `t + D`.

The TUNs are opened with a virtio-net header and TSO/checksum offload, so the kernels hand
over GSO super-frames (up to 64 KiB) rather than 1500-byte packets: that keeps the line's
frame rate (and CPU) low. The 10-byte header passes through untouched, so checksum and GSO
metadata survive and TCP keeps its MSS-1448 view of the path. By default the cap charges
what the packets would occupy on an MTU-1500 wire: a super-frame of n segments costs its
length plus (n - 1) copies of its IP+TCP headers (`--no-wire-headers` charges raw frame bytes).

`DelayLine` is that arithmetic alone (no I/O, no clock), so it is unit-tested without root.

Measured on this 2-core box (link-rig.md): RTT = 2D + ~1 ms (Python's epoll has 1 ms grain),
the cap holds to ~0.1 % at steady state, ~1.5 CPU-s per GB for few fast flows. The TUN
`txqueuelen` is raised to 20000: with the default 500 the sending kernel silently drops
frames (visible only as the TUN's `tx_dropped`) whenever this process is descheduled.

Lifecycle
---------
`python -m bench.linkemu run ...` creates and configures both namespaces, prints one JSON
line starting with `READY` on stdout, forwards frames until SIGTERM/SIGINT (or until its
parent dies, when started by `LinkRig`), then kills every process left inside the two
namespaces and deletes them. `python -m bench.linkemu down` removes a stale rig.
`LinkRig` is the context manager the benchmark and tests use; it also tears the rig down
from `atexit` and on SIGTERM.

Addresses exist only inside the two private namespaces (default 10.200.0.1 for the client,
10.200.0.2 for the registry, point-to-point); no route leads anywhere else.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import netns

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR_LEN = 10  # struct virtio_net_hdr: flags u8, gso_type u8, hdr_len, gso_size, csum_start, csum_offset (u16 each)
MAX_FRAME = VNET_HDR_LEN + 65536 + 256

PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------------------------------
# the arithmetic (sans I/O)


class DelayLine:
    """One direction of the link: FIFO rate cap with a drop-tail queue, then a fixed delay.

    `offer(now, nbytes)` returns the time the frame leaves the far end, or None if the queue is
    full and the frame is dropped. Times are seconds on any monotonic clock.
    """

    def __init__(self, delay_s: float, rate_Bps: float, queue_bytes: int):
        if delay_s < 0 or rate_Bps < 0 or queue_bytes <= 0:
            raise ValueError("delay and rate must be >= 0 and queue_bytes > 0")
        self.delay_s = delay_s
        self.rate_Bps = rate_Bps
        self.queue_bytes = queue_bytes
        self.busy_until = 0.0
        self.offered_frames = self.dropped_frames = 0
        self.offered_bytes = self.dropped_bytes = 0
        self.max_backlog_bytes = 0

    def backlog_bytes(self, now: float) -> float:
        """Bytes queued ahead of a frame arriving at `now` (not yet on the wire)."""
        if not self.rate_Bps:
            return 0.0
        return max(0.0, self.busy_until - now) * self.rate_Bps

    def offer(self, now: float, nbytes: int) -> float | None:
        self.offered_frames += 1
        self.offered_bytes += nbytes
        if not self.rate_Bps:
            return now + self.delay_s
        start = max(now, self.busy_until)
        backlog = (start - now) * self.rate_Bps
        if backlog + nbytes > self.queue_bytes:
            self.dropped_frames += 1
            self.dropped_bytes += nbytes
            return None
        self.busy_until = start + nbytes / self.rate_Bps
        self.max_backlog_bytes = max(self.max_backlog_bytes, int(backlog + nbytes))
        return self.busy_until + self.delay_s

    def stats(self) -> dict:
        return {
            "offered_frames": self.offered_frames,
            "offered_bytes": self.offered_bytes,
            "dropped_frames": self.dropped_frames,
            "dropped_bytes": self.dropped_bytes,
            "max_backlog_bytes": self.max_backlog_bytes,
        }


def wire_bytes(frame: bytes | memoryview, per_segment_headers: bool = True) -> int:
    """Bytes `frame` (virtio-net header + IP packet) occupies on an MTU-sized wire.

    A GSO super-frame carrying n segments is charged its IP length plus (n - 1) extra copies of
    its IPv4+TCP headers, i.e. what n separate packets would cost. Anything that is not a GSO
    IPv4/TCP frame is charged its IP length.
    """
    iplen = len(frame) - VNET_HDR_LEN
    if not per_segment_headers or iplen < 40:
        return max(iplen, 0)
    gso_type = frame[1]
    gso_size = frame[4] | (frame[5] << 8)
    if gso_type == 0 or gso_size == 0:
        return iplen
    ip0 = frame[VNET_HDR_LEN]
    if ip0 >> 4 != 4 or frame[VNET_HDR_LEN + 9] != 6:
        return iplen
    ihl = (ip0 & 0x0F) * 4
    thl = (frame[VNET_HDR_LEN + ihl + 12] >> 4) * 4
    hdr = ihl + thl
    payload = iplen - hdr
    if payload <= gso_size:
        return iplen
    nseg = -(-payload // gso_size)
    return iplen + (nseg - 1) * hdr


# ---------------------------------------------------------------------------------------------
# parameters


@dataclasses.dataclass(frozen=True)
class LinkParams:
    rtt_ms: float = 200.0
    rate_MBps: float = 50.0  # 10^6 bytes/s; 0 = uncapped
    queue_bytes: int = 30_000_000  # drop-tail limit per direction; 3 BDP at 200 ms / 50 MB/s
    server_wmem: str = "4096 16384 4194304"  # net.ipv4.tcp_wmem in the registry namespace (Linux default)
    client_rmem: str = ""  # net.ipv4.tcp_rmem in the client namespace; "" = inherit the host's
    congestion: str = "bbr"  # net.ipv4.tcp_congestion_control in both namespaces
    wire_headers: bool = True  # charge per-segment IP+TCP headers of GSO frames against the cap
    mtu: int = 1500
    prefix: str = "obd"  # namespace and device names: {prefix}-reg, {prefix}-cli, {prefix}-tr, {prefix}-tc
    client_addr: str = "10.200.0.1"
    server_addr: str = "10.200.0.2"
    rt_priority: int = 10  # SCHED_FIFO priority of the line process (0: SCHED_OTHER with nice -5)

    @property
    def reg_ns(self) -> str:
        return f"{self.prefix}-reg"

    @property
    def cli_ns(self) -> str:
        return f"{self.prefix}-cli"

    @property
    def reg_dev(self) -> str:
        return f"{self.prefix}-tr"

    @property
    def cli_dev(self) -> str:
        return f"{self.prefix}-tc"

    def argv(self) -> list[str]:
        a = [
            "--rtt-ms", str(self.rtt_ms),
            "--rate-mbps", str(self.rate_MBps),
            "--queue-bytes", str(self.queue_bytes),
            "--server-wmem", self.server_wmem,
            "--client-rmem", self.client_rmem,
            "--cc", self.congestion,
            "--mtu", str(self.mtu),
            "--prefix", self.prefix,
            "--client-addr", self.client_addr,
            "--server-addr", self.server_addr,
            "--rt-priority", str(self.rt_priority),
        ]
        if not self.wire_headers:
            a.append("--no-wire-headers")
        return a


def add_param_args(p: argparse.ArgumentParser) -> None:
    d = LinkParams()
    p.add_argument("--rtt-ms", type=float, default=d.rtt_ms, help="round-trip time; each direction is delayed by half (default %(default)s)")
    p.add_argument("--rate-mbps", type=float, default=d.rate_MBps, help="cap per direction in MB/s (10^6 B/s); 0 = uncapped (default %(default)s)")
    p.add_argument("--queue-bytes", type=float, default=d.queue_bytes, help="drop-tail queue per direction (default %(default)s = 3 BDP)")
    p.add_argument("--server-wmem", default=d.server_wmem, help="net.ipv4.tcp_wmem in the registry namespace (default %(default)r, the Linux default)")
    p.add_argument("--client-rmem", default=d.client_rmem, help="net.ipv4.tcp_rmem in the client namespace (default: inherit)")
    p.add_argument("--cc", default=d.congestion, help="TCP congestion control in both namespaces (reno or bbr; default %(default)s)")
    p.add_argument("--no-wire-headers", action="store_true", help="charge raw frame bytes instead of per-segment headers")
    p.add_argument("--mtu", type=int, default=d.mtu)
    p.add_argument("--prefix", default=d.prefix, help="name prefix of namespaces and devices (default %(default)s)")
    p.add_argument("--client-addr", default=d.client_addr)
    p.add_argument("--server-addr", default=d.server_addr)
    p.add_argument("--rt-priority", type=int, default=d.rt_priority,
                   help="run the line SCHED_FIFO at this priority so other tenants' CPU load does not add "
                        "delay jitter (it sleeps in epoll; kernel RT throttling still applies); 0 = nice -5 only")


def params_from_args(a: argparse.Namespace) -> LinkParams:
    return LinkParams(
        rtt_ms=a.rtt_ms,
        rate_MBps=a.rate_mbps,
        queue_bytes=int(a.queue_bytes),
        server_wmem=a.server_wmem,
        client_rmem=a.client_rmem,
        congestion=a.cc,
        wire_headers=not a.no_wire_headers,
        mtu=a.mtu,
        prefix=a.prefix,
        client_addr=a.client_addr,
        server_addr=a.server_addr,
        rt_priority=a.rt_priority,
    )


# ---------------------------------------------------------------------------------------------
# namespace setup and teardown


def open_tun(ns: str, ifname: str) -> int:
    """Create TUN `ifname` inside namespace `ns`; returns its non-blocking fd. The device lives
    as long as the fd."""
    with netns.entered(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR).ljust(40, b"\0")
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except BaseException:
            os.close(fd)
            raise
    os.set_blocking(fd, False)
    return fd


def setup_namespaces(p: LinkParams) -> None:
    for ns in (p.reg_ns, p.cli_ns):
        netns.create(ns)
    for ns in (p.reg_ns, p.cli_ns):
        netns.sysctl(ns, "net.ipv4.tcp_no_metrics_save", "1")
        netns.sysctl(ns, "net.ipv4.tcp_congestion_control", p.congestion)
    netns.sysctl(p.reg_ns, "net.ipv4.tcp_wmem", p.server_wmem)
    if p.client_rmem:
        netns.sysctl(p.cli_ns, "net.ipv4.tcp_rmem", p.client_rmem)


def configure_devices(p: LinkParams) -> None:
    for ns, dev, local, peer in (
        (p.cli_ns, p.cli_dev, p.client_addr, p.server_addr),
        (p.reg_ns, p.reg_dev, p.server_addr, p.client_addr),
    ):
        netns.ip("-n", ns, "addr", "add", local, "peer", peer, "dev", dev)
        netns.ip("-n", ns, "link", "set", dev, "up", "mtu", str(p.mtu), "txqueuelen", "20000")


def teardown_namespaces(p: LinkParams) -> None:
    for ns in (p.cli_ns, p.reg_ns):
        netns.delete(ns)


def describe(p: LinkParams) -> dict:
    """Parameters plus the TCP sysctls actually in force on each side."""
    keys = ("net.ipv4.tcp_wmem", "net.ipv4.tcp_rmem", "net.ipv4.tcp_congestion_control",
            "net.ipv4.tcp_no_metrics_save", "net.ipv4.tcp_slow_start_after_idle",
            "net.core.rmem_max", "net.core.wmem_max")
    d = dataclasses.asdict(p)
    d["sysctl"] = {
        side: {k: netns.sysctl_get(ns, k) for k in keys}
        for side, ns in (("registry", p.reg_ns), ("client", p.cli_ns))
    }
    return d


# ---------------------------------------------------------------------------------------------
# the forwarding loop


class _Dir:
    __slots__ = ("name", "line", "src", "dst", "q", "delivered_frames", "delivered_bytes", "write_errors")

    def __init__(self, name: str, line: DelayLine, src: int, dst: int):
        self.name, self.line, self.src, self.dst = name, line, src, dst
        self.q: collections.deque = collections.deque()
        self.delivered_frames = self.delivered_bytes = self.write_errors = 0

    def stats(self) -> dict:
        return {**self.line.stats(), "delivered_frames": self.delivered_frames,
                "delivered_bytes": self.delivered_bytes, "write_errors": self.write_errors,
                "queued_frames": len(self.q)}


class Forwarder:
    """Moves frames between the two TUN fds through one DelayLine per direction."""

    EARLY_S = 0.0003  # deliver frames due within this margin now (epoll has ms grain)

    def __init__(self, p: LinkParams, fd_cli: int, fd_reg: int, stats_path: str | None = None):
        delay = p.rtt_ms / 2000.0
        rate = p.rate_MBps * 1e6
        self.p = p
        self.up = _Dir("c2s", DelayLine(delay, rate, p.queue_bytes), fd_cli, fd_reg)
        self.down = _Dir("s2c", DelayLine(delay, rate, p.queue_bytes), fd_reg, fd_cli)
        self.by_src = {fd_cli: self.up, fd_reg: self.down}
        self.stats_path = stats_path
        self.stop = False
        self.t0 = time.monotonic()

    def stats(self) -> dict:
        return {"t": time.monotonic() - self.t0, "wall": time.time(),
                "c2s": self.up.stats(), "s2c": self.down.stats()}

    def _write_stats(self) -> None:
        if not self.stats_path:
            return
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self.stats_path)

    def run(self) -> None:
        ep = select.epoll()
        for fd in self.by_src:
            ep.register(fd, select.EPOLLIN)
        dirs = (self.up, self.down)
        hdrs = self.p.wire_headers
        mono = time.monotonic
        read, write = os.read, os.write
        next_stats = 0.0
        try:
            while not self.stop:
                now = mono()
                for d in dirs:
                    q = d.q
                    limit = now + self.EARLY_S
                    while q and q[0][0] <= limit:
                        frame = q.popleft()[1]
                        try:
                            write(d.dst, frame)
                            d.delivered_frames += 1
                            d.delivered_bytes += len(frame) - VNET_HDR_LEN
                        except OSError:
                            d.write_errors += 1
                if now >= next_stats:
                    self._write_stats()
                    next_stats = now + 0.1
                due = [d.q[0][0] for d in dirs if d.q]
                timeout = min(min(due) - now, next_stats - now) if due else next_stats - now
                try:
                    events = ep.poll(max(timeout, 0.0))
                except InterruptedError:
                    continue
                for fd, _ in events:
                    d = self.by_src[fd]
                    line, q = d.line, d.q
                    for _ in range(512):  # bounded, so delivery is never starved
                        try:
                            frame = read(fd, MAX_FRAME)
                        except BlockingIOError:
                            break
                        except OSError:
                            break
                        at = line.offer(mono(), wire_bytes(frame, hdrs))
                        if at is not None:
                            q.append((at, frame))
        finally:
            ep.close()
            with contextlib.suppress(OSError):
                self._write_stats()


def set_realtime(priority: int) -> str:
    """SCHED_FIFO (children reset to normal) at `priority`, or back to SCHED_OTHER for 0."""
    try:
        if priority > 0:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
            return f"SCHED_FIFO {priority}"
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as e:
        return f"SCHED_OTHER (SCHED_FIFO refused: {e.strerror})"
    return f"SCHED_OTHER nice {os.nice(0)}"


def run(p: LinkParams, stats_path: str | None) -> int:
    """Set up, print READY, forward until signalled, tear down. Always tears down."""
    stop_flag: list[Forwarder] = []

    def on_signal(signum, frame):
        if stop_flag:
            stop_flag[0].stop = True
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(teardown_namespaces, p)
    fds: list[int] = []
    try:
        with contextlib.suppress(OSError):
            os.nice(-5)  # the line must not be descheduled behind the benchmark's own load
        setup_namespaces(p)
        fds = [open_tun(p.cli_ns, p.cli_dev), open_tun(p.reg_ns, p.reg_dev)]
        configure_devices(p)
        fwd = Forwarder(p, fds[0], fds[1], stats_path)
        stop_flag.append(fwd)
        info = describe(p)
        info["line_sched"] = set_realtime(p.rt_priority)
        print("READY " + json.dumps(info), flush=True)
        try:
            fwd.run()
        finally:
            set_realtime(0)
        with contextlib.suppress(OSError):  # the parent may be gone (BrokenPipeError)
            print("STATS " + json.dumps(fwd.stats()), flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        teardown_namespaces(p)
        if stats_path:
            for f in (stats_path, stats_path + ".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(f)


# ---------------------------------------------------------------------------------------------
# LinkRig: the context manager used by the benchmark and the tests


def set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class LinkRig:
    """Start the line in a child process; tear everything down on exit.

    ```
    with LinkRig(LinkParams(rtt_ms=200, rate_MBps=50)) as rig:
        rig.popen_reg(["docker-registry", "serve", cfg])
        rig.run_cli(["curl", ...])
    ```
    Processes started through `popen_reg`/`popen_cli` are stopped on exit; anything else left
    inside the namespaces is killed when the line deletes them.
    """

    def __init__(self, params: LinkParams = LinkParams(), stats_path: str | None = None, python: str = sys.executable):
        self.p = params
        self.stats_path = stats_path or f"/tmp/{params.prefix}-linkemu-{os.getpid()}.json"
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.final_stats: dict = {}
        self.children: list[subprocess.Popen] = []
        self._old_sigterm = None

    # -- lifecycle
    def __enter__(self) -> "LinkRig":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        for ns in (self.p.reg_ns, self.p.cli_ns):
            if netns.exists(ns):
                raise FileExistsError(f"namespace {ns} exists: another rig is running, or run `python -m bench.linkemu down --prefix {self.p.prefix}`")
        argv = [self.python, "-m", "bench.linkemu", "run", "--stats-file", self.stats_path, *self.p.argv()]
        self.proc = subprocess.Popen(
            argv, cwd=str(Path(__file__).resolve().parent.parent), stdout=subprocess.PIPE,
            text=True, preexec_fn=set_pdeathsig,
        )
        atexit.register(self.close)
        if threading_is_main():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"link emulator failed to start (exit {self.proc.returncode}); see its stderr")
        self.info = json.loads(line[6:])

    def _on_sigterm(self, signum, frame):
        self.close()
        raise SystemExit(128 + signum)

    def close(self) -> None:
        for c in reversed(self.children):
            stop_process(c)
        self.children.clear()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    out, _ = self.proc.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    out, _ = self.proc.communicate()
                for line in (out or "").splitlines():
                    if line.startswith("STATS "):
                        self.final_stats = json.loads(line[6:])
            self.proc = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.stats_path)
        teardown_namespaces(self.p)  # in case the line died without cleaning up
        if self._old_sigterm is not None and threading_is_main():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # -- helpers
    @property
    def server_addr(self) -> str:
        return self.p.server_addr

    def stats(self) -> dict:
        """Latest line counters (refreshed every 0.1 s by the line)."""
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return self.final_stats

    def tun_stats(self) -> dict:
        return {
            "registry": netns.link_stats(self.p.reg_ns, self.p.reg_dev),
            "client": netns.link_stats(self.p.cli_ns, self.p.cli_dev),
        }

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        kw.setdefault("preexec_fn", set_pdeathsig)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.children.append(proc)
        return proc

    def popen_reg(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return self.popen(self.p.reg_ns, argv, **kw)

    def popen_cli(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return self.popen(self.p.cli_ns, argv, **kw)

    def run_cli(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return netns.nsexec(self.p.cli_ns, argv, **kw)

    def run_reg(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return netns.nsexec(self.p.reg_ns, argv, **kw)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stop_process(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.linkemu", description="Emulated long, capped link between two network namespaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="create the namespaces and forward until SIGTERM/SIGINT")
    add_param_args(r)
    r.add_argument("--stats-file", help="rewrite line counters as JSON here every 0.1 s")
    dn = sub.add_parser("down", help="delete a stale rig's namespaces (and what runs in them)")
    dn.add_argument("--prefix", default=LinkParams.prefix)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("linkemu: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    if a.cmd == "down":
        teardown_namespaces(LinkParams(prefix=a.prefix))
        return 0
    return run(params_from_args(a), a.stats_file)


if __name__ == "__main__":
    sys.exit(main())
