"""Network-namespace helpers for the link rig (root only).

Everything here acts on namespaces this rig creates by name; nothing touches the root
namespace's interfaces, addresses or sysctls. Namespaces are made with `ip netns add`, so they
are bind-mounted under /run/netns/NAME and can be entered with `ip netns exec NAME ...` or, from
Python, with `entered(NAME)` (setns(2) on the calling thread only).

Sockets keep the namespace they were created in: create a socket inside `entered(ns)` and use
it anywhere in the process afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name`, then switch back.

    Not for use across awaits: the switch is per OS thread, so keep the body synchronous.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def nsexec(name: str, argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(["ip", "netns", "exec", name, *argv], check=check, **kw)


def sysctl(name: str, key: str, value: str) -> None:
    """Set one sysctl inside namespace `name` (net.* keys are per namespace)."""
    nsexec(name, ["sysctl", "-qw", f"{key}={value}"])


def sysctl_get(name: str, key: str) -> str:
    return nsexec(name, ["sysctl", "-n", key]).stdout.strip().replace("\t", " ")


def create(name: str) -> None:
    """Create an empty namespace with loopback up and IPv6 off (the rig is IPv4 only)."""
    if exists(name):
        raise FileExistsError(errno.EEXIST, f"network namespace {name} already exists (stale rig? run `python -m bench.linkemu down`)")
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")
    sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")


def pids(name: str) -> list[int]:
    out = ip("netns", "pids", name, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def kill_all(name: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process living in namespace `name` (all started by this rig), then SIGKILL
    whatever is left after `grace_s`. Returns the pids that were signalled."""
    victims = [p for p in pids(name) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in victims):
            time.sleep(0.05)
        if not any(_alive(p) for p in victims):
            break
    return victims


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def delete(name: str) -> None:
    """Kill what runs inside `name`, then remove it. Idempotent."""
    if not exists(name):
        return
    kill_all(name)
    ip("netns", "delete", name, check=False)


def link_stats(name: str, dev: str) -> dict:
    """rx/tx byte, packet and drop counters of `dev` inside namespace `name`."""
    base = f"/sys/class/net/{dev}/statistics/"
    keys = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped")
    # /sys/class/net shows the namespace of whoever mounted sysfs, so read it from inside.
    out = nsexec(name, ["sh", "-c", f"cd {base} && cat {' '.join(keys)}"]).stdout.split()
    return dict(zip(keys, (int(x) for x in out)))


def nstat(name: str, *counters: str) -> dict[str, int]:
    """Absolute SNMP counters (e.g. TcpRetransSegs) of namespace `name`."""
    out = nsexec(name, ["nstat", "-a", "-z", "-s", "-j", *counters], check=False).stdout
    import json

    try:
        data = json.loads(out)
    except ValueError:
        return {}
    res: dict[str, int] = {}
    for table in data.values():
        if isinstance(table, dict):
            res.update({k: int(v) for k, v in table.items()})
    return res
