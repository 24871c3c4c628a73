"""Registry authentication: WWW-Authenticate challenges, Basic, Bearer tokens cached per scope.

Theory of operation. Nothing is known about a registry host until it answers 401 (or 403) with a
``WWW-Authenticate`` challenge; until then requests go anonymous (as upstream's first probe does).
The challenge is remembered per host:

* ``Basic`` → every later request to that host carries ``Basic base64(user:pass)`` for the blob's
  credentials (CredentialProvider);
* ``Bearer realm=..,service=..,scope=..`` → a token is fetched with ``GET <realm>?service=&scope=``
  (Basic credentials attached when there are any) and cached per (realm, service, scope) until
  ``expires_in`` (default 60 s, as the distribution token spec says) minus a safety margin. Later
  requests for the same repository reuse it; a token nearing expiry is replaced before use.

A 401 to a request that *did* carry our header means the token expired or was revoked in the middle
of a long fill: `on_challenge(..., sent=header)` drops that token (only if it is still the current
one: with dozens of concurrent range GETs, the first 401 refreshes and the others find a newer token
already there) and fetches a new one. Token fetches are single-flight per scope. The caller retries
its request once; a second 401 is AuthError("Authentication failed").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from .aiohttp_loader import aiohttp

from ..errors import AuthError, RemoteError, RemoteTimeout
from .credentials import CredentialProvider
from .redact import describe, redact_url

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y",scope="a b"`` → ("bearer", {realm, service, scope}).

    Tolerates unquoted values, spaces after commas, escaped quotes and commas inside quotes.
    Only the first challenge of a header is used.
    """
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            val = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                val.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(val)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params


def repository_of(url: str) -> str | None:
    """`/v2/<name>/blobs/<digest>` → name (None for other paths)."""
    path = urllib.parse.urlsplit(url).path
    if not path.startswith("/v2/"):
        return None
    rest = path[4:]
    for marker in ("/blobs/", "/manifests/"):
        idx = rest.rfind(marker)
        if idx > 0:
            return rest[:idx]
    return None


@dataclass
class Token:
    value: str
    expires_at: float  # time.monotonic()

    @property
    def header(self) -> str:
        return "Bearer " + self.value

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


@dataclass
class _HostAuth:
    scheme: str  # "basic" | "bearer"
    params: dict[str, str]


class Authenticator:
    """Per-client auth state. `session()` returns the client's aiohttp session (lazy)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession], credentials: CredentialProvider,
                 stats, *, timeout: aiohttp.ClientTimeout, request_options: Callable[[str, dict], dict] | None = None):
        self._session = session
        self.credentials = credentials
        self.stats = stats
        self.timeout = timeout
        # headers=, ssl=, proxy= for a request to a URL
        self._request_options = request_options or (lambda url, headers: {"headers": headers})
        self._hosts: dict[str, _HostAuth] = {}
        self._tokens: dict[tuple[str, str, str], Token] = {}
        self._basic: dict[str, str] = {}  # host/repo → header
        self._inflight: dict[tuple[str, str, str], asyncio.Future] = {}

    # -- what to send ----------------------------------------------------------------------
    def _scope_key(self, url: str, ha: _HostAuth) -> tuple[str, str, str]:
        repo = repository_of(url)
        scope = f"repository:{repo}:pull" if repo else ha.params.get("scope", "")
        return (ha.params.get("realm", ""), ha.params.get("service", ""), scope)

    async def header_for(self, url: str) -> str | None:
        """Authorization header value for a request to `url`, or None (anonymous)."""
        host = urllib.parse.urlsplit(url).netloc
        ha = self._hosts.get(host)
        if ha is None:
            return None
        if ha.scheme == "basic":
            key = f"{host}/{repository_of(url) or ''}"
            h = self._basic.get(key)
            if h is None:
                cred = await self.credentials.get(url)
                if cred is None:
                    return None
                h = self._basic[key] = cred.basic_header()
            return h
        key = self._scope_key(url, ha)
        tok = self._tokens.get(key)
        if tok is None or not tok.fresh(time.monotonic()):
            tok = await self._fetch_token(url, key)
        return tok.header

    # -- reacting to 401/403 -------------------------------------------------------------
    async def on_challenge(self, url: str, challenge: str | None, sent: str | None) -> None:
        """Learn from a 401/403 challenge; make the next header_for(url) differ from `sent`.

        Raises AuthError when that is impossible (no credentials, same credentials rejected,
        token server refused).
        """
        host = urllib.parse.urlsplit(url).netloc
        if not challenge:
            raise AuthError(f"Authentication failed: {url} answered 401 without a WWW-Authenticate challenge", status=401, url=url)
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            self._hosts[host] = _HostAuth("basic", params)
            key = f"{host}/{repository_of(url) or ''}"
            cred = await self.credentials.get(url, refresh=sent is not None)
            if cred is None:
                raise AuthError(f"Authentication failed: {url} needs credentials and none are configured for it", status=401, url=url)
            h = cred.basic_header()
            if h == sent:
                raise AuthError(f"Authentication failed: {url} rejected the configured credentials", status=401, url=url)
            self._basic[key] = h
            return
        if scheme != "bearer":
            raise AuthError(f"Authentication failed: {url} wants unsupported auth scheme {scheme!r}", status=401, url=url)
        if not params.get("realm") or not params.get("service"):
            raise AuthError(f"Authentication failed: {url} sent an incomplete Bearer challenge {challenge!r}", status=401, url=url)
        ha = _HostAuth("bearer", params)
        self._hosts[host] = ha
        key = self._scope_key(url, ha)
        cur = self._tokens.get(key)
        if sent is not None:
            if cur is not None and cur.header != sent and cur.fresh(time.monotonic()):
                return  # somebody refreshed already
            if cur is not None and cur.header == sent:
                del self._tokens[key]
            self.stats.auth_refreshes += 1
        elif cur is not None and cur.fresh(time.monotonic()):
            return
        await self._fetch_token(url, key, refresh=sent is not None, challenge_scope=params.get("scope"))

    def forget(self, url: str) -> None:
        """Drop everything cached for url's host (e.g. after credentials changed)."""
        host = urllib.parse.urlsplit(url).netloc
        self._hosts.pop(host, None)
        for k in [k for k in self._basic if k.startswith(host + "/")]:
            del self._basic[k]

    # -- tokens -------------------------------------------------------------------------
    async def _fetch_token(self, url: str, key: tuple[str, str, str], *, refresh: bool = False,
                           challenge_scope: str | None = None) -> Token:
        """Single flight per scope. The fetch runs as its own task, so a waiter's cancel never
        cancels it for the others (shielded)."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._request_token(url, key, refresh=refresh, challenge_scope=challenge_scope))
            self._inflight[key] = task

            def done(t: asyncio.Future, key=key) -> None:
                if self._inflight.get(key) is t:
                    del self._inflight[key]
                if not t.cancelled() and t.exception() is None:
                    self._tokens[key] = t.result()

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        for t in list(self._inflight.values()):
            t.cancel()
        self._inflight.clear()

    async def _request_token(self, url: str, key: tuple[str, str, str], *, refresh: bool,
                             challenge_scope: str | None) -> Token:
        realm, service, scope = key
        scopes = [scope] if scope else []
        if challenge_scope and challenge_scope not in scopes:
            scopes.append(challenge_scope)
        q = [("service", service)] + [("scope", s) for s in scopes]
        token_url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(q)
        cred = await self.credentials.get(url, refresh=refresh)
        headers = {}
        if cred is not None and cred.username:
            headers["Authorization"] = cred.basic_header()
        self.stats.token_requests += 1
        try:
            async with self._session().get(token_url, timeout=self.timeout, allow_redirects=True,
                                           **self._request_options(token_url, headers)) as resp:
                body = await resp.read()
                status = resp.status
        except asyncio.TimeoutError as e:
            raise RemoteTimeout(f"token request to {realm} for {url} timed out", url=url) from e
        except aiohttp.ClientError as e:
            raise RemoteError(f"token request to {redact_url(realm)} for {url} failed: {describe(e)}", url=url) from e
        if status != 200:
            raise AuthError(f"Authentication failed: token server {realm} answered {status} for {url}"
                            f"{' (credentials rejected)' if status in (401, 403) and cred else ''}",
                            status=status, url=url)
        try:
            obj = json.loads(body)
            value = obj.get("token") or obj.get("access_token")
            expires_in = obj.get("expires_in") or DEFAULT_TOKEN_LIFETIME
            expires_in = float(expires_in)
        except (ValueError, AttributeError, TypeError) as e:
            raise AuthError(f"Authentication failed: token server {realm} sent an unreadable answer for {url}", url=url) from e
        if not isinstance(value, str) or not value:
            raise AuthError(f"Authentication failed: token server {realm} sent no token for {url}", url=url)
        margin = min(10.0, expires_in * 0.1)
        return Token(value, time.monotonic() + max(0.0, expires_in - margin))
