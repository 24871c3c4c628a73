"""RegistryClient: ranged blob reads from any OCI registry over one aiohttp session.

Theory of operation
-------------------
A read is ``GET <blob url>`` with ``Range: bytes=<first>-<last>``; the body goes straight into the
caller's buffer (``read_range_into``). Around that one request:

* Endpoints. ``GlobalConfig.mirrors`` are tried first (scheme://host of the blob URL replaced by the
  mirror's URL, path unchanged); a mirror that fails (any RemoteError but a range past the end) is
  skipped for ``RetryPolicy.mirror_penalty`` seconds and the origin is asked instead. With
  ``p2pConfig.enable`` the request goes to ``<p2pConfig.address>/<blob or resolved URL>`` (as
  upstream) before the origin, with the same fallback.
* Auth (auth.Authenticator). Anonymous until a 401/403 with a challenge; then Basic or a Bearer
  token cached per scope. A 401 to an authorised request (token expired in the middle of a long
  fill) refreshes the token and retries that request once; a second refusal is AuthError.
* Redirects are followed by hand (``allow_redirects=False``): a 3xx from the registry names the
  real location (e.g. an S3 presigned URL). It is cached per blob URL for ``redirect_ttl`` seconds
  (or until the URL's own expiry when it says so: X-Amz-Date+X-Amz-Expires / Expires) and later
  reads go there directly, **never with the registry's Authorization header** (nor any header but
  Range/User-Agent). A 400/401/403/404 from the storage host drops the cached location and the
  blob is re-resolved through the registry (at most ``RetryPolicy.reresolve`` times per read).
* Retries with jittered exponential backoff on connection errors, timeouts, short bodies and
  5xx; 429/503 wait for ``Retry-After`` (seconds or HTTP date, capped) instead. A body that stops
  early is not re-fetched from the start: the remainder is asked for. Attempts that made
  progress don't use up the retry budget (bounded separately).
* Statuses: 206 must carry the Content-Range asked for; 200 to a ranged request (Range ignored)
  is accepted only for blobs up to ``RetryPolicy.ignore_range_limit`` (read and sliced), else
  RemoteError; 416 → RangeNotSatisfiable naming the blob size, at once, without reading the body
  (docker-registry's 416 carries a false Content-Length); 404 → RemoteError "blob not found";
  401/403 after authenticating → AuthError "Authentication failed".

Cancellation: every response is used inside ``async with``; a read cancelled mid-body releases
(closes) its connection, and never cancels a token fetch other reads wait for. Only bytes of the
current request are written to the caller's buffer, so a cancelled read leaves a partly filled
buffer, never a corrupted neighbour.

Never here: priorities, deduplication, caching of data, concurrency policy (scheduler.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field

from .aiohttp_loader import aiohttp

from .. import __version__
from ..config import GlobalConfig
from ..errors import AuthError, RemoteError, RemoteTimeout
from .auth import Authenticator
from .credentials import CredentialProvider
from .endpoints import Endpoint, endpoints, host_of
from .proxy import proxy_for
from .redact import describe, redact_url

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.I)
_REDIRECTS = (301, 302, 303, 307, 308)


class RangeNotSatisfiable(RemoteError):
    """The range starts (or ends) past the end of the blob; `size` is the blob size when known."""

    def __init__(self, message: str, *, size: int | None, url: str | None = None):
        self.size = size
        super().__init__(message, status=416, url=url)


@dataclass(frozen=True)
class Timeouts:
    """Per HTTP request. `total` bounds one request (headers + body); `auth` the token/helper calls."""

    connect: float = 10.0
    sock_read: float = 30.0
    total: float | None = 300.0
    auth: float = 30.0

    def client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.total, sock_connect=self.connect, sock_read=self.sock_read)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per read without progress (so 4 retries)
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    retry_after_max: float = 60.0  # longer Retry-After values are capped to this
    reresolve: int = 2  # storage-host failures → re-resolve through the registry
    max_redirects: int = 5
    redirect_ttl: float = 300.0
    mirror_penalty: float = 30.0
    ignore_range_limit: int = 16 << 20  # a 200 to a ranged GET is sliced only for blobs up to this


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent for blobs (not token/helper requests)
    bytes: int = 0  # body bytes delivered into callers' buffers
    retries: int = 0
    auth_refreshes: int = 0  # tokens replaced after a 401 on an authorised request
    token_requests: int = 0
    redirects: int = 0  # locations resolved through the registry
    reresolves: int = 0  # cached locations dropped after the storage host refused them
    mirror_fallbacks: int = 0
    errors: int = 0  # reads that raised
    retries_by_cause: dict = field(default_factory=dict)  # retry_cause(reason) -> count

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Location:
    url: str
    expires_at: float  # monotonic


@dataclass
class _Attempt:
    """State of one read across retries."""

    failures: int = 0
    loops: int = 0
    auth_tries: int = 0
    reresolves: int = 0
    redirects: int = 0
    last: BaseException | None = None
    notes: list[str] = field(default_factory=list)


class _Retry(Exception):
    def __init__(self, reason: str, delay: float | None = None, progress: bool = False):
        self.reason = reason
        self.delay = delay
        self.progress = progress


def retry_cause(reason: str) -> str:
    """The metrics label of a retry reason (the `_Retry`/except texts in _fetch)."""
    if reason.startswith(("429", "503")):
        return "throttled"
    if reason.startswith("server error"):
        return "server_error"
    if reason.startswith("timed out"):
        return "timeout"
    if reason.startswith("connection failed"):
        return "connection"
    if reason.startswith(("body of", "short body")):
        return "broken_body"
    return "other"


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, dt.timestamp() - time.time())


def _presigned_expiry(url: str) -> float | None:
    """Seconds until a presigned URL says it expires (S3 v4/v2, GCS), when it says so."""
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    try:
        if "X-Amz-Date" in q and "X-Amz-Expires" in q:
            t0 = time.mktime(time.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")) - time.timezone
            return t0 + float(q["X-Amz-Expires"][0]) - time.time()
        if "X-Goog-Date" in q and "X-Goog-Expires" in q:
            t0 = time.mktime(time.strptime(q["X-Goog-Date"][0], "%Y%m%dT%H%M%SZ")) - time.timezone
            return t0 + float(q["X-Goog-Expires"][0]) - time.time()
        for k in ("Expires", "X-Expires", "se"):
            if k in q:
                v = q[k][0]
                if v.isdigit():
                    return float(v) - time.time()
    except (ValueError, OverflowError):
        return None
    return None


async def _drain_small(resp: aiohttp.ClientResponse, limit: int = 65536) -> None:
    """Read a small error/redirect body so the connection can be reused; else let it close."""
    n = resp.content_length
    if n is not None and n <= limit:
        try:
            await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            resp.close()


def _monotonic(progress):
    """Wrap a progress callback so it only ever sees growing values (an endpoint fallback
    starts the buffer again from 0, rewriting bytes that were already final: same blob)."""
    if progress is None:
        return None
    best = 0

    def report(n: int) -> None:
        nonlocal best
        if n > best:
            best = n
            progress(n)

    return report


class RegistryClient:
    """Ranged reads of registry blobs. One per daemon; safe for many concurrent reads on one loop.

    blob URL = ImageConfig.repo_blob_url + "/" + digest.
    """

    def __init__(self, global_config: GlobalConfig, *, max_connections: int = 64,
                 timeouts: Timeouts | None = None, retry: RetryPolicy | None = None,
                 credentials: CredentialProvider | None = None, socket_factory=None):
        self.config = global_config
        self.socket_factory = socket_factory  # e.g. Preconnector.socket_factory (aiohttp's TCPConnector)
        self.max_connections = max_connections
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.user_agent = global_config.user_agent or f"tcmu-obd/{__version__}"
        self.stats = ClientStats()
        self.credentials = credentials or CredentialProvider(global_config.effective_credentials,
                                                             user_agent=self.user_agent)
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        self._ctimeout = self.timeouts.client_timeout()
        self.auth = Authenticator(self._get_session, self.credentials, self.stats,
                                  timeout=aiohttp.ClientTimeout(total=self.timeouts.auth,
                                                                sock_connect=self.timeouts.connect),
                                  request_options=self._request_options)
        self._proxies: dict[tuple[str, str], dict] = {}
        self._locations: dict[str, _Location] = {}
        self._mirror_bad_until: dict[str, float] = {}
        self._sizes: dict[str, int] = {}
        self._closed = False

    # ----------------------------------------------------------------------------- session
    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            cc = self.config.cert_config
            if cc.cert_file:
                ctx.load_cert_chain(cc.cert_file, cc.key_file or None)
            self._ssl = ctx
        return self._ssl

    def _ssl_for(self, url: str):
        """ssl= argument for a request: False for an insecure mirror, else the verifying context."""
        if not url.startswith("https:"):
            return None
        host = host_of(url)
        for m in self.config.mirrors:
            if m.insecure and host_of(m.url) == host:
                return False
        return self._ssl_context()

    def _proxy_options(self, url: str) -> dict:
        """proxy= and the proxy's credentials for a request to `url` (HTTP(S)_PROXY / NO_PROXY,
        decided once per scheme and host; remote/proxy.py)."""
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.netloc.rpartition("@")[2])
        opts = self._proxies.get(key)
        if opts is None:
            p = proxy_for(url)
            opts = {}
            if p is not None:
                opts["proxy"] = p.url
                if p.username is not None:
                    opts["proxy_headers"] = {"Proxy-Authorization": aiohttp.encode_basic_auth(p.username, p.password or "")}
            self._proxies[key] = opts
        return opts

    def _request_options(self, url: str, headers: dict[str, str]) -> dict:
        """aiohttp request options for `url`: headers, TLS (_ssl_for) and the proxy."""
        opts = {"ssl": self._ssl_for(url), **self._proxy_options(url)}
        if "proxy_headers" in opts and url.startswith("http:"):
            # aiohttp sends proxy_headers on a CONNECT (https) only; a plain http request is
            # forwarded by the proxy and carries the proxy's credentials itself
            headers = {**headers, **opts["proxy_headers"]}
        opts["headers"] = headers
        return opts

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RemoteError("RegistryClient is closed")
        if self._session is None:
            # Every request passes ssl=_ssl_for(url), so the connector needs no context of its
            # own; ours is built on the first https request (~30 ms less start-up for http).
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections,
                                             ttl_dns_cache=300, keepalive_timeout=60,
                                             socket_factory=self.socket_factory)
            # No trust_env: the proxy comes with each request (_request_options), and
            # credentials only from the credential sources, never from ~/.netrc.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  headers={"User-Agent": self.user_agent},
                                                  timeout=self._ctimeout)
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        await self.auth.aclose()
        await self.credentials.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ----------------------------------------------------------------------------- public API
    async def blob_size(self, blob_url: str) -> int:
        """Size of the blob in bytes (GET Range: bytes=0-0 → Content-Range total, as upstream).

        Raises RemoteError ("blob not found" on 404), AuthError, RemoteTimeout.
        """
        cached = self._sizes.get(blob_url)
        if cached is not None:
            return cached
        one = bytearray(1)
        try:
            size = await self._read(blob_url, 0, memoryview(one), want_size=True)
        except RangeNotSatisfiable as e:
            if e.size == 0:
                size = 0
            else:
                raise
        self._sizes[blob_url] = size
        return size

    async def read_range(self, blob_url: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or RemoteError / RemoteTimeout / AuthError."""
        buf = bytearray(length)
        await self.read_range_into(blob_url, offset, memoryview(buf))
        return bytes(buf)

    async def read_range_into(self, blob_url: str, offset: int, buf: memoryview, *, progress=None) -> None:
        """Fill all of `buf` with the blob bytes at `offset` (same errors as read_range).

        `progress`: optional sync callable ``progress(n)``, called as the body arrives with
        the number of bytes at the start of `buf` that are final (non-decreasing, ends with
        len(buf) on success). It lets the caller use a prefix before the whole range is in
        (the scheduler publishes it to the cache); it must not raise or block.
        """
        if not isinstance(buf, memoryview):
            buf = memoryview(buf)
        if buf.readonly:
            raise ValueError("read_range_into needs a writable buffer")
        if buf.ndim != 1 or buf.itemsize != 1:
            buf = buf.cast("B")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if len(buf) == 0:
            return
        await self._read(blob_url, offset, buf, progress=_monotonic(progress))

    def open_blob(self, blob_url: str, size: int, name: str | None = None) -> "RemoteBlob":
        """A BlobSource over one blob (the size must be known: manifest / config / blob_size())."""
        return RemoteBlob(self, blob_url, size, name)

    # ----------------------------------------------------------------------------- endpoints
    def _endpoints(self, blob_url: str) -> list[Endpoint]:
        """endpoints.endpoints without the mirrors and agent in their penalty time."""
        now = time.monotonic()
        return endpoints(self.config, blob_url, lambda key: self._mirror_bad_until.get(key, 0) > now)

    async def _read(self, blob_url: str, offset: int, buf: memoryview, want_size: bool = False,
                    progress=None) -> int:
        try:
            eps = self._endpoints(blob_url)
            for i, (url, via, key) in enumerate(eps):
                try:
                    return await self._fetch(url, offset, buf, via=via, on_progress=progress)
                except RangeNotSatisfiable:
                    raise
                except RemoteError as e:
                    if key is None or i == len(eps) - 1:
                        raise
                    self._mirror_bad_until[key] = time.monotonic() + self.retry.mirror_penalty
                    self.stats.mirror_fallbacks += 1
                    log.warning("%s failed (%s); skipping it for %.0f s", key, e, self.retry.mirror_penalty)
            raise AssertionError("unreachable")
        except RemoteError:
            self.stats.errors += 1
            raise

    # ----------------------------------------------------------------------------- one read
    async def _fetch(self, url: str, offset: int, buf: memoryview, via: str | None = None, on_progress=None) -> int:
        """Fill buf from `url` (one endpoint); returns the blob size from Content-Range.
        `on_progress(pos)`: buf[:pos] is final (see read_range_into)."""
        n = len(buf)
        last = offset + n - 1
        pos = 0
        st = _Attempt()
        session = self._get_session()
        total = -1
        while True:
            st.loops += 1
            start = offset + pos
            loc = self._locations.get(url)
            if loc is not None and loc.expires_at <= time.monotonic():
                del self._locations[url]
                loc = None
            headers = {"Range": f"bytes={start}-{last}"}
            if loc is not None:
                target, sent_auth = loc.url, None
            else:
                target = url
                sent_auth = await self.auth.header_for(url)
                if sent_auth:
                    headers["Authorization"] = sent_auth
            try:
                self.stats.requests += 1
                sent_to = via + target if via else target
                async with session.get(sent_to, allow_redirects=False,
                                       **self._request_options(sent_to, headers)) as resp:
                    status = resp.status
                    if status == 206:
                        total = self._check_content_range(resp, url, start, last)
                        want = n - pos
                        got = 0
                        content = resp.content
                        try:
                            while got < want:
                                chunk = await content.readany()
                                if not chunk:
                                    break
                                k = len(chunk)
                                if k > want - got:
                                    raise RemoteError(f"{url}: server sent more than the {want} bytes asked for "
                                                      f"(bytes={start}-{last})", status=status, url=url)
                                buf[pos : pos + k] = chunk
                                pos += k
                                got += k
                                self.stats.bytes += k
                                if on_progress is not None:
                                    on_progress(pos)
                        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                            raise _Retry(f"body of bytes={start}-{last} broke after {got} bytes: {describe(e)}",
                                         progress=got > 0) from e
                        if pos < n:
                            raise _Retry(f"short body: {got} of {want} bytes for bytes={start}-{last}",
                                         progress=got > 0)
                        return total
                    if status == 200:
                        size = await self._ignored_range(resp, url, offset, buf, pos)
                        if on_progress is not None:
                            on_progress(n)
                        return size
                    if status in _REDIRECTS:
                        where = resp.headers.get("Location")
                        if not where:
                            raise RemoteError(f"{url}: {status} redirect without Location", status=status, url=url)
                        st.redirects += 1
                        if st.redirects > self.retry.max_redirects:
                            raise RemoteError(f"{url}: more than {self.retry.max_redirects} redirects", status=status, url=url)
                        new = urllib.parse.urljoin(target, where)
                        ttl = self.retry.redirect_ttl
                        exp = _presigned_expiry(new)
                        if exp is not None:
                            ttl = min(ttl, max(0.0, exp - 5.0))
                        self._locations[url] = _Location(new, time.monotonic() + ttl)
                        self.stats.redirects += 1
                        await _drain_small(resp)
                        continue
                    if loc is not None and status in (400, 401, 403, 404):
                        # the storage host refused the resolved URL (expired, revoked): re-resolve
                        self._locations.pop(url, None)
                        st.reresolves += 1
                        self.stats.reresolves += 1
                        if st.reresolves > self.retry.reresolve:
                            raise RemoteError(f"{url}: storage host refused the resolved location "
                                              f"({status}) {st.reresolves} times", status=status, url=url)
                        continue
                    if status in (401, 403):
                        challenge = resp.headers.get("WWW-Authenticate")
                        if status == 403 and (sent_auth or not challenge):
                            raise AuthError(f"Authentication failed: {url} answered 403 (access denied)",
                                            status=403, url=url)
                        st.auth_tries += 1
                        if st.auth_tries > 2:
                            raise AuthError(f"Authentication failed: {url} answered {status} after authenticating",
                                            status=status, url=url)
                        await _drain_small(resp)
                        try:
                            await self.auth.on_challenge(url, challenge, sent_auth)
                        except AuthError as e:
                            proxy = self._proxy_options(sent_to).get("proxy")
                            if proxy is None:
                                raise
                            # some proxies (tinyproxy) refuse with 401, not 407
                            raise AuthError(f"{e} (the request went through the proxy {proxy}: "
                                            f"the {status} may be the proxy's)", status=status, url=url) from e
                        continue
                    if status == 407:
                        raise AuthError(f"{url}: the proxy {self._proxy_options(sent_to).get('proxy')} refused the "
                                        "request (407 Proxy Authentication Required): check the credentials in "
                                        "HTTP(S)_PROXY", status=407, url=url)
                    if status == 404:
                        raise RemoteError(f"{url}: blob not found (404)", status=404, url=url)
                    if status == 416:
                        size = None
                        m = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
                        if m:
                            size = int(m.group(1))
                        resp.close()  # docker-registry's 416 lies in Content-Length: drop the connection
                        raise RangeNotSatisfiable(
                            f"{url}: range bytes={start}-{last} is past the end of the blob"
                            f" ({'size ' + str(size) if size is not None else 'size unknown'})", size=size, url=url)
                    if status in (429, 503):
                        ra = _parse_retry_after(resp.headers.get("Retry-After"))
                        raise _Retry(f"{status} {'Too many requests' if status == 429 else 'Service unavailable'}",
                                     delay=None if ra is None else min(ra, self.retry.retry_after_max))
                    if status >= 500:
                        raise _Retry(f"server error {status}")
                    raise RemoteError(f"{url}: unexpected response {status} {resp.reason or ''}".rstrip(),
                                      status=status, url=url)
            except _Retry as r:
                reason, delay, progress = r.reason, r.delay, r.progress
                st.last = r.__cause__
            except aiohttp.ClientConnectorCertificateError as e:
                raise RemoteError(f"{redact_url(target)}: TLS certificate verification failed: {e}", url=url) from e
            except aiohttp.ClientSSLError as e:
                raise RemoteError(f"{redact_url(target)}: TLS error: {e}", url=url) from e
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as e:
                reason, delay, progress = f"timed out: {describe(e)}" if str(e) else "timed out", None, False
                st.last = e
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                reason, delay, progress = f"connection failed: {describe(e)}", None, False
                st.last = e
            except aiohttp.InvalidURL as e:
                raise RemoteError(f"{redact_url(target)}: invalid URL", url=url) from e
            # ---- retry bookkeeping
            st.notes.append(reason)
            if loc is not None and not progress:
                # a failing storage location may be the problem; resolve again next time
                self._locations.pop(url, None)
            if progress:
                if st.loops > self.retry.attempts * 8:
                    raise RemoteError(f"{url}: gave up after {st.loops} partial transfers (last: {reason})", url=url)
            else:
                st.failures += 1
                if st.failures >= self.retry.attempts:
                    msg = f"{url}: {reason} (after {st.failures} attempts)"
                    if isinstance(st.last, TimeoutError):
                        raise RemoteTimeout(msg, url=url) from st.last
                    status = 429 if reason.startswith("429") else 503 if reason.startswith("503") else None
                    raise RemoteError(msg, status=status, url=url) from st.last
            self.stats.retries += 1
            cause = retry_cause(reason)
            self.stats.retries_by_cause[cause] = self.stats.retries_by_cause.get(cause, 0) + 1
            if delay is None:
                if progress:
                    delay = 0.0
                else:
                    base = min(self.retry.backoff_max, self.retry.backoff_initial * (2 ** (st.failures - 1)))
                    delay = base * random.uniform(0.5, 1.0)
            log.debug("retrying %s bytes=%d-%d in %.3f s: %s", url, offset + pos, last, delay, reason)
            if delay > 0:
                await asyncio.sleep(delay)

    def _check_content_range(self, resp: aiohttp.ClientResponse, url: str, start: int, last: int) -> int:
        cr = resp.headers.get("Content-Range", "")
        m = _CONTENT_RANGE.match(cr)
        if not m:
            resp.close()
            raise RemoteError(f"{url}: 206 without a usable Content-Range ({cr!r})", status=206, url=url)
        a, b = int(m.group(1)), int(m.group(2))
        total = -1 if m.group(3) == "*" else int(m.group(3))
        if a != start:
            resp.close()
            raise RemoteError(f"{url}: asked for bytes={start}-{last}, got Content-Range {cr!r}", status=206, url=url)
        if b != last:
            resp.close()
            if total >= 0 and b == total - 1 and last >= total:
                raise RangeNotSatisfiable(f"{url}: range bytes={start}-{last} is past the end of the blob "
                                          f"(size {total})", size=total, url=url)
            raise RemoteError(f"{url}: asked for bytes={start}-{last}, got Content-Range {cr!r}", status=206, url=url)
        return total

    async def _ignored_range(self, resp: aiohttp.ClientResponse, url: str, offset: int, buf: memoryview,
                             pos: int) -> int:
        """A 200 to a ranged GET: the whole blob. Slice it when small, else refuse."""
        size = resp.content_length
        limit = self.retry.ignore_range_limit
        if size is None or size > limit:
            resp.close()
            raise RemoteError(f"{url}: server ignored Range and sent the whole blob "
                              f"({size if size is not None else 'unknown'} bytes, limit {limit})", status=200, url=url)
        data = await resp.read()
        size = len(data)
        start = offset + pos
        end = offset + len(buf)
        if end > size:
            raise RangeNotSatisfiable(f"{url}: range bytes={offset}-{end - 1} is past the end of the blob (size {size})",
                                      size=size, url=url)
        buf[pos:] = data[start:end]
        self.stats.bytes += end - start
        return size


class RemoteBlob:
    """BlobSource over one registry blob (name, size, read_into, aclose)."""

    def __init__(self, client: RegistryClient, blob_url: str, size: int, name: str | None = None):
        self.client = client
        self.url = blob_url
        self.size = size
        self.name = name or blob_url
        self.digest = blob_url.rsplit("/", 1)[-1]

    async def read_into(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        if offset < 0 or end > self.size:
            raise RangeNotSatisfiable(f"{self.name}: read [{offset}, {end}) past end {self.size}", size=self.size,
                                      url=self.url)
        await self.client.read_range_into(self.url, offset, buf)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<RemoteBlob {self.name} size={self.size}>"
