"""Open the registry's TCP connections while the rest of the program is still loading.

Before `tcmu-obd fetch` can send its first range GET it spends ~0.3 s loading the HTTP client
and its own modules; then every one of its fresh connections pays one round trip for the TCP
handshake (200 ms to a far registry) before its request can leave. The handshake needs none of
that code: the kernel completes a non-blocking connect() on its own. `Preconnector` starts the
connections the first burst will use before the heavy imports (at once for an address; in a
thread for a name, since resolving it blocks) and hands them to aiohttp through its
connector's `socket_factory`, so the first requests go out on connections that are already
open (as browsers' preconnect does).

Only the first hop is opened early, and only when no proxy stands in the way (aiohttp then
connects to the proxy, not to the registry). A socket whose connect failed is discarded and a
fresh one given instead; sockets nobody took are closed by `close()`. Nothing here speaks HTTP
or TLS: aiohttp does both on the socket it is given.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import urllib.parse

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}


class _EarlySocket(socket.socket):
    """A socket whose connect() was started early: connecting again to the same peer succeeds
    at once when the handshake is done (Linux says EISCONN) and is waited for while it is still
    in progress (EALREADY, which asyncio treats as "not yet")."""

    def connect(self, address) -> None:  # noqa: D102 - behaviour in the class docstring
        try:
            super().connect(address)
        except OSError as e:
            if e.errno != errno.EISCONN:
                raise


class Preconnector:
    """`count` TCP connections to the host of `url`, started now, taken by `socket_factory`."""

    def __init__(self, url: str, count: int):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in _DEFAULT_PORTS or not u.hostname:
            raise ValueError(f"cannot preconnect to {url!r}: not an http(s) URL")
        self.host = u.hostname
        self.port = u.port or _DEFAULT_PORTS[u.scheme]
        self.count = count
        self.opened = 0  # connects started
        self.taken = 0  # handed to the HTTP client
        self.discarded = 0  # found failed when taken
        self.error: str | None = None  # why fewer than `count` were started
        self._ready: list[tuple[int, tuple, _EarlySocket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None  # only to resolve a name
        self._done = threading.Event()

    def start(self) -> "Preconnector":
        try:
            # bytes, not str: an address is ASCII, and a str host would load the IDNA codec
            # (~2 ms of start-up) only to encode it
            infos = socket.getaddrinfo(self.host.encode("ascii", "replace"), self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            # a name: resolving it may block, so a thread resolves it and starts the connects
            self._thread = threading.Thread(target=self._resolve_and_open, name="preconnect", daemon=True)
            self._thread.start()
            return self
        # An address needs no lookup and a non-blocking connect() returns at once: started
        # here, the handshakes leave within ~2 ms of each other (from a thread that competes
        # with the imports for the GIL, they spread over ~25 ms).
        try:
            self._open_all(infos[0])
        finally:
            self._done.set()
        return self

    def _resolve_and_open(self) -> None:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as e:
            self.error = f"resolving {self.host}: {e}"
        else:
            self._open_all(infos[0])
        finally:
            self._done.set()

    def _open_all(self, info) -> None:
        family, type_, proto, _, address = info
        for _ in range(self.count):
            sock = _EarlySocket(family, type_ | socket.SOCK_NONBLOCK, proto)
            err = sock.connect_ex(address)
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                self.error = f"connecting to {address[0]} port {address[1]}: {errno.errorcode.get(err, err)}"
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._ready.append((family, address[:2], sock))
                self.opened += 1

    def wait(self, timeout: float | None = None) -> bool:
        """True once every connect has been started (or the attempt ended early: see `error`)."""
        return self._done.wait(timeout)

    def stats(self) -> dict:
        return {"host": f"{self.host}:{self.port}", "opened": self.opened, "taken": self.taken,
                "discarded": self.discarded, "error": self.error}

    def socket_factory(self, addr_info) -> socket.socket:
        """aiohttp's TCPConnector(socket_factory=...): an early socket to the same address when
        one is left and healthy, else a fresh socket."""
        family, type_, proto, _, address = addr_info
        while True:
            with self._lock:
                i = next((i for i, (f, a, _) in enumerate(self._ready) if f == family and a == address[:2]), None)
                if i is None:
                    break
                _, _, sock = self._ready.pop(i)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                self.taken += 1
                return sock
            self.discarded += 1
            sock.close()
        return socket.socket(family, type_, proto)

    def close(self) -> None:
        """Close the sockets nobody took (idempotent)."""
        with self._lock:
            self._closed = True
            left, self._ready = self._ready, []
        for _, _, sock in left:
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.opened:
            log.debug("preconnect %s:%d: %d opened, %d used, %d failed", self.host, self.port,
                      self.opened, self.taken, self.discarded)
