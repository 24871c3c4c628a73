"""Fault injection in front of a real registry, and an S3-like presigned-URL storage host.

Usage: ``with FaultProxy(registry.url) as proxy:`` then point the client at ``proxy.url`` (same
paths as the registry). Add faults with ``proxy.add(Fault(...))``; each fault matches requests by
method and a path substring, lets ``skip`` matching requests through, then affects the next
``times`` of them (``times=-1``: forever), and counts ``hits``. Kinds:

* ``"status"``  answer `status` with `headers`/`body` without asking the registry
  (503/429 with ``{"Retry-After": "0"}``, 404, 416 with ``Content-Range: bytes */N``, ...);
* ``"reset"``   forward, send the headers and the first `after_bytes` bytes of the body, then
  abort the TCP connection (a connection reset mid-body);
* ``"delay"``   sleep `delay` seconds before forwarding (slow first byte);
* ``"slow"``    forward, but send the body in `chunk` byte pieces with `delay` s between them;
* ``"unauthorized"`` answer 401 with the registry's own challenge (the request is replayed to the
  registry without Authorization to get its WWW-Authenticate), as a registry does when a token
  expires in the middle of a long fill;
* ``"corrupt"`` forward, but flip (xor 0xFF) the byte at blob offset `at` in the body (wrong bytes
  with a correct length and status: only the digest or a ZFile CRC can tell);
* ``"truncate"`` forward the headers (true Content-Length) and the first `after_bytes` bytes, then
  close the connection cleanly (FIN, not RST): a short body;
* ``"stall"``   forward the headers and the first `after_bytes` bytes, then send nothing for `delay`
  seconds (longer than the client's read timeout), then drop the connection;
* ``"down"``    the registry is away: every request (any path, any method, while the fault is in
  the list) has its connection dropped without an answer. `go_down()` adds one and also drops
  every body being sent; `come_back()` removes it.

`at` (a blob offset, -1 = any) also narrows any fault to requests whose Range covers that byte.
`proxy.sent` counts body bytes sent per request path (2xx bodies only), and
`proxy.sent_bytes(match)` sums them: the bound on what the server sent in total.
`proxy.rate` (bytes/s, 0 = off) paces all bodies together like one link of that capacity, so
the sender, not the receiver's CPU, sets the pace (benchmarks; bytes in flight stay ~real).

With ``FaultProxy(registry.url, storage=PresignedStorage(registry.blob_path))`` the proxy acts like
a registry on S3: an authorised blob GET answers 307 to a signed, expiring storage URL (HEAD is
still answered by the registry). The storage host serves Range GETs from the registry's own
filesystem, refuses expired or tampered URLs with 403, and refuses (400, as S3 does) and records
any request carrying an Authorization header: assert ``storage.auth_violations == []``.
``storage.expire_all()`` invalidates every URL issued so far. ``proxy.log`` / ``storage.log``
record every request (`Logged`: method, path, headers, status, fault). Both servers run on one
background event-loop thread, so they work from sync fixtures and under any test event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aiohttp import ClientPayloadError, ClientSession, ClientTimeout, TCPConnector, web

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass
class Fault:
    kind: str = "status"
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    times: int = 1
    skip: int = 0
    match: str = "/blobs/"
    method: str | None = "GET"
    after_bytes: int = 0
    delay: float = 0.0
    chunk: int = 65536
    at: int = -1
    hits: int = 0
    seen: int = 0

    def _take(self, method: str, path: str, span: tuple[int, int | None] = (0, None)) -> bool:
        if self.kind == "down":
            self.hits += 1
            return True
        if self.method and method != self.method:
            return False
        if self.match and self.match not in path:
            return False
        if self.at >= 0 and not (span[0] <= self.at and (span[1] is None or self.at <= span[1])):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times >= 0 and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    fault: str | None = None


async def _abort_after_flush(request: web.Request, *, clean: bool = False) -> None:
    """Let the bytes already written reach the peer, then reset the connection (`clean`: close
    it with a FIN instead, as a server that just stops sending does)."""
    tr = request.transport
    if tr is None:
        return
    deadline = time.monotonic() + 5
    while tr.get_write_buffer_size() > 0 and time.monotonic() < deadline and not tr.is_closing():
        await asyncio.sleep(0.001)
    if clean:
        tr.close()
    else:
        tr.abort()


_RANGE = re.compile(r"^\s*bytes=(\d+)-(\d*)\s*$")


def _span(range_header: str | None) -> tuple[int, int | None]:
    """(first, last or None) of a `Range: bytes=a-b` header; a request without one is the blob."""
    m = _RANGE.match(range_header or "")
    if not m:
        return 0, None
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


class _LoopThread:
    """One asyncio loop in a daemon thread; run coroutines on it from any thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class _Server:
    def __init__(self):
        self._lt: _LoopThread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.port = 0
        self._lock = threading.Lock()

    def _app(self) -> web.Application:
        raise NotImplementedError

    async def _astart(self):
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _astop(self):
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self, lt: _LoopThread | None = None):
        self._own_lt = lt is None
        self._lt = lt or _LoopThread(type(self).__name__)
        self._lt.run(self._astart())
        return self

    def stop(self):
        if self._lt is None:
            return
        try:
            self._lt.run(self._astop())
        finally:
            if self._own_lt:
                self._lt.close()
            self._lt = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------------


class PresignedStorage(_Server):
    """An S3-like blob host: GET /bucket/<algo>/<hex>?X-Expires=<unix>&X-Gen=<n>&X-Signature=<hmac>.

    locate(digest) -> Path of the blob's bytes (e.g. RegistryProcess.blob_path).
    """

    def __init__(self, locate: Callable[[str], Path], *, ttl: float = 300.0):
        super().__init__()
        self.locate = locate
        self.ttl = ttl
        self.key = secrets.token_bytes(16)
        self.generation = 0
        self.log: list[Logged] = []
        self.auth_violations: list[Logged] = []
        self.faults: list[Fault] = []

    def expire_all(self) -> None:
        with self._lock:
            self.generation += 1

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _sig(self, path: str, expires: int, gen: int) -> str:
        return hmac.new(self.key, f"{path}|{expires}|{gen}".encode(), hashlib.sha256).hexdigest()

    def sign(self, digest: str, ttl: float | None = None) -> str:
        algo, hexd = digest.split(":", 1)
        path = f"/bucket/{algo}/{hexd}"
        expires = int(time.time() + (self.ttl if ttl is None else ttl))
        with self._lock:
            gen = self.generation
        q = urllib.parse.urlencode({"X-Expires": expires, "X-Gen": gen, "X-Signature": self._sig(path, expires, gen)})
        return f"{self.url}{path}?{q}"

    def _app(self):
        app = web.Application()
        app.router.add_route("*", "/bucket/{algo}/{hex}", self._handle)
        return app

    async def _handle(self, request: web.Request):
        entry = Logged(request.method, request.path_qs, dict(request.headers))
        with self._lock:
            self.log.append(entry)
            fault = next((f for f in self.faults if f._take(request.method, request.path)), None)
        if fault is not None:
            entry.fault, entry.status = fault.kind, fault.status
            return web.Response(status=fault.status, headers=fault.headers, body=fault.body)
        if "Authorization" in request.headers:
            with self._lock:
                self.auth_violations.append(entry)
            entry.status = 400
            return web.Response(status=400, text="<Error><Code>InvalidArgument</Code><Message>Only one auth "
                                "mechanism allowed</Message></Error>", content_type="application/xml")
        q = request.query
        try:
            expires, gen = int(q["X-Expires"]), int(q["X-Gen"])
            good = hmac.compare_digest(q["X-Signature"], self._sig(request.path, expires, gen))
        except (KeyError, ValueError):
            good, expires, gen = False, 0, -1
        if not good:
            entry.status = 403
            return web.Response(status=403, text="<Error><Code>SignatureDoesNotMatch</Code></Error>",
                                content_type="application/xml")
        with self._lock:
            current = self.generation
        if time.time() > expires or gen != current:
            entry.status = 403
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code><Message>Request has "
                                "expired</Message></Error>", content_type="application/xml")
        p = self.locate(f"{request.match_info['algo']}:{request.match_info['hex']}")
        if not os.path.exists(p):
            entry.status = 404
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        entry.status = 200
        return web.FileResponse(p, headers={"Content-Type": "application/octet-stream"})


class FaultProxy(_Server):
    """HTTP proxy (reverse) in front of `upstream` that injects `Fault`s; see module docstring."""

    def __init__(self, upstream: str, *, storage: PresignedStorage | None = None):
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.storage = storage
        self.faults: list[Fault] = []
        self.log: list[Logged] = []
        self._session: ClientSession | None = None
        self.redirects = 0
        self.sent: dict[str, int] = {}
        self.rate = 0.0
        self._stopping = False
        self._link_free = 0.0
        self._streaming: set = set()  # transports of bodies being sent (go_down drops them)

    def sent_bytes(self, match: str = "/blobs/") -> int:
        with self._lock:
            return sum(n for path, n in self.sent.items() if match in path)

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self.faults:
                self.faults.remove(fault)

    def go_down(self) -> Fault:
        """The registry goes away: drop every body being sent and every request from now on,
        until come_back()."""
        f = Fault(kind="down", match="", method=None, times=-1)
        with self._lock:
            self.faults.insert(0, f)

        def drop():
            for tr in list(self._streaming):
                tr.abort()

        self._lt.loop.call_soon_threadsafe(drop)
        return f

    def come_back(self) -> None:
        with self._lock:
            self.faults[:] = [f for f in self.faults if f.kind != "down"]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def count(self, match: str = "/blobs/", method: str | None = "GET") -> int:
        with self._lock:
            return sum(1 for e in self.log if match in e.path and (method is None or e.method == method))

    def start(self, lt: _LoopThread | None = None):
        lt = lt or _LoopThread("FaultProxy")
        try:
            if self.storage is not None and self.storage._lt is None:
                self.storage.start(lt)
            return super().start(lt)
        finally:
            self._own_lt = True

    def stop(self):
        self._stopping = True
        if self.storage is not None and self.storage._lt is self._lt and self._lt is not None:
            self.storage._lt.run(self.storage._astop())
            self.storage._lt = None
        super().stop()

    async def _astart(self):
        self._session = ClientSession(connector=TCPConnector(limit=256, ssl=False), auto_decompress=False,
                                      timeout=ClientTimeout(total=None, sock_connect=10, sock_read=60))
        await super()._astart()

    async def _astop(self):
        await super()._astop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _app(self):
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def _fwd_headers(self, request: web.Request, drop_auth: bool = False) -> dict[str, str]:
        h = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if drop_auth:
            h.pop("Authorization", None)
        return h

    async def _handle(self, request: web.Request):
        entry = Logged(request.method, request.path_qs, dict(request.headers))
        with self._lock:
            self.log.append(entry)
            span = _span(request.headers.get("Range"))
            fault = next((f for f in self.faults if f._take(request.method, request.path, span)), None)
        entry.fault = fault.kind if fault else None
        if fault is not None and fault.kind == "down":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        if fault is not None and fault.kind == "status":
            entry.status = fault.status
            return web.Response(status=fault.status, headers=fault.headers, body=fault.body)
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.kind == "unauthorized":
            async with self._session.request("GET", self.upstream + request.path_qs,
                                             headers=self._fwd_headers(request, drop_auth=True),
                                             allow_redirects=False) as up:
                await up.read()
                hdrs = {}
                if "WWW-Authenticate" in up.headers:
                    hdrs["WWW-Authenticate"] = up.headers["WWW-Authenticate"]
                hdrs.update(fault.headers)
            entry.status = 401
            return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "token expired"}]},
                                     status=401, headers=hdrs)
        body = await request.read() if request.can_read_body else None
        if (self.storage is not None and request.method == "GET"
                and re.search(r"/blobs/sha256:[0-9a-f]{64}$", request.path)):
            return await self._redirect(request, entry)
        return await self._forward(request, entry, fault, body)

    async def _send(self, resp: web.StreamResponse, path: str, data) -> None:
        # counted before the write, so once the client has a byte it is in the count; taken
        # back when the connection is already gone (nothing left)
        self._count(path, len(data))
        try:
            await resp.write(data)
        except ConnectionError:
            self._count(path, -len(data))
            raise

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.sent[path] = self.sent.get(path, 0) + n

    async def _stall(self, request: web.Request, seconds: float) -> None:
        """Send nothing for `seconds`, or until the client hangs up or the proxy stops (a
        stalled handler must not hold up stop() for the rest of a long stall)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end and self._lt is not None and not self._stopping:
            tr = request.transport
            if tr is None or tr.is_closing():
                return
            await asyncio.sleep(min(0.05, end - loop.time()))

    async def _pace(self, n: int) -> None:
        """One shared link: each chunk leaves when the chunks before it have."""
        if self.rate <= 0:
            return
        now = asyncio.get_running_loop().time()
        self._link_free = max(now, self._link_free) + n / self.rate
        if self._link_free > now:
            await asyncio.sleep(self._link_free - now)

    def _is_down(self) -> bool:
        with self._lock:
            return any(f.kind == "down" for f in self.faults)

    async def _redirect(self, request: web.Request, entry: Logged):
        h = self._fwd_headers(request)
        h.pop("Range", None)
        async with self._session.head(self.upstream + request.path_qs, headers=h, allow_redirects=False) as up:
            if up.status != 200:
                entry.status = up.status
                hdrs = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(status=up.status, headers=hdrs)
        digest = request.path.rsplit("/", 1)[1]
        with self._lock:
            self.redirects += 1
        entry.status = 307
        return web.Response(status=307, headers={"Location": self.storage.sign(digest)})

    async def _forward(self, request: web.Request, entry: Logged, fault: Fault | None, body):
        up_cm = self._session.request(request.method, self.upstream + request.path_qs,
                                      headers=self._fwd_headers(request), data=body, allow_redirects=False)
        async with up_cm as up:
            entry.status = up.status
            if up.status >= 300 and request.method != "HEAD":
                # error bodies are small; the registry's 416 even lies in Content-Length and closes
                try:
                    data = await up.read()
                except (ClientPayloadError, ConnectionError):
                    data = up.content._buffer and b"".join(up.content._buffer) or b""
                hdrs = {k: v for k, v in up.headers.items()
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"}
                return web.Response(status=up.status, reason=up.reason, headers=hdrs, body=data)
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding":
                    resp.headers.add(k, v)
            clen = up.headers.get("Content-Length")
            if clen is not None and up.status != 416 and request.method != "HEAD":
                resp.content_length = int(clen)
            elif request.method == "HEAD" and clen is not None:
                resp.headers["Content-Length"] = clen
            try:
                await resp.prepare(request)
            except ConnectionError:  # dropped by go_down() while the registry answered
                return resp
            if request.method == "HEAD":
                return resp
            first = _span(request.headers.get("Range"))[0] if up.status == 206 else 0
            kind = fault.kind if fault is not None else None
            cut = fault.after_bytes if kind in ("reset", "truncate", "stall") else None
            flip = fault.at - first if kind == "corrupt" else None
            path = request.path
            sent = 0
            tr = request.transport
            self._streaming.add(tr)
            try:
                piece = fault.chunk if kind == "slow" else 1 << 16 if self.rate > 0 else 1 << 18
                async for chunk in up.content.iter_chunked(piece):
                    await self._pace(len(chunk))
                    if self._is_down():
                        tr.abort()
                        return resp
                    if flip is not None and sent <= flip < sent + len(chunk):
                        chunk = bytearray(chunk)
                        chunk[flip - sent] ^= 0xFF
                    if cut is not None and sent + len(chunk) >= cut:
                        room = max(0, cut - sent)
                        if room:
                            await self._send(resp, path, chunk[:room])
                        if kind == "stall":
                            await self._stall(request, fault.delay)
                        await _abort_after_flush(request, clean=kind == "truncate")
                        return resp
                    await self._send(resp, path, chunk)
                    sent += len(chunk)
                    if kind == "slow":
                        await asyncio.sleep(fault.delay)
            except (ClientPayloadError, ConnectionError):
                if request.transport:
                    request.transport.abort()
                return resp
            finally:
                self._streaming.discard(tr)
            if cut is not None:  # the body was shorter than the cut: break it at its end
                if kind == "stall":
                    await self._stall(request, fault.delay)
                await _abort_after_flush(request, clean=kind == "truncate")
                return resp
            await resp.write_eof()
            return resp


# ---------------------------------------------------------------------------------------------
# pytest fixtures

import pytest  # noqa: E402


@pytest.fixture
def fault_proxy():
    """Factory: `proxy = fault_proxy(upstream_url, storage=None)`; started now, stopped at teardown."""
    started: list[FaultProxy] = []

    def make(upstream: str, *, storage: PresignedStorage | None = None) -> FaultProxy:
        p = FaultProxy(upstream, storage=storage).start()
        started.append(p)
        return p

    yield make
    for p in reversed(started):
        p.stop()


@pytest.fixture
def presigned_storage():
    """Factory: `storage = presigned_storage(registry.blob_path, ttl=300)` (not started: hand it to
    fault_proxy(..., storage=storage), which starts and stops it)."""

    def make(locate, *, ttl: float = 300.0) -> PresignedStorage:
        return PresignedStorage(locate, ttl=ttl)

    return make
