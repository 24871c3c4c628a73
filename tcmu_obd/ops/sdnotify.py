"""systemd readiness notification (sd_notify) for `Type=notify` units.

The protocol is one datagram per message on the unix socket named by $NOTIFY_SOCKET,
holding newline-separated VAR=value assignments (READY=1, STOPPING=1, STATUS=...). A name
starting with "@" is in the abstract namespace (the "@" stands for a leading NUL byte).
Without $NOTIFY_SOCKET (not started by systemd) every call is a no-op, so the commands
call these unconditionally. A failed send is logged and ignored: readiness reporting must
never take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(env: Mapping[str, str] | None = None) -> str | None:
    """The address to send to, or None when there is none we can use."""
    name = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not name:
        return None
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    # e.g. systemd 254's vsock: addresses, meant for VMs; not for a process on the host
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: not notifying", name)
    return None


def notify(*assignments: str, env: Mapping[str, str] | None = None) -> bool:
    """Send VAR=value lines as one message; True if a message was sent."""
    address = socket_address(env)
    if address is None:
        return False
    for a in assignments:
        if "=" not in a or "\n" in a:
            raise ValueError(f"sd_notify assignment must be one VAR=value line, got {a!r}")
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as e:
        log.warning("sd_notify to %r failed: %s", address.replace("\0", "@"), e)
        return False
    return True


def ready(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """READY=1 (systemd considers the unit started), with a STATUS line when given."""
    return notify("READY=1", *_status(status), env=env)


def stopping(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: the service has begun shutting down."""
    return notify("STOPPING=1", *_status(status), env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: a one-line free-form state shown by `systemctl status`."""
    return notify(*_status(text), env=env)


def _status(text: str | None) -> list[str]:
    # one line only: a newline would start a new (bogus) assignment
    return [] if text is None else [f"STATUS={' '.join(text.splitlines())}"]
