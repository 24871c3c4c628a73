"""Registry credentials: upstream's credential file format, key matching, and credentialConfig modes.

Format (as overlaybd's parse_auths): ``{"auths": {"<key>": {"auth": base64("user:pass")} |
{"username": "...", "password": "..."}}}``.

Matching (upstream): the blob URL ``http(s)://host/v2/<p1>/.../<pk>/blobs/<digest>`` yields the
candidate keys ``host``, ``host/p1``, ``host/p1/p2`` … ``host/p1/…/pk`` (the ``v2`` and ``blobs``
segments dropped; ``host`` includes a port). Entries are scanned in JSON order and the first whose
key exactly equals any candidate wins — not the longest match. Docker-style keys
("https://index.docker.io/v1/") never match there.

Convenience fallback (tcmu-obd only): when the configured source yields nothing, the ``auths`` of
``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``) are tried with their keys
normalised (scheme and a trailing ``/v1/`` or ``/v2/`` dropped; ``index.docker.io`` →
``registry-1.docker.io`` too), then matched the same way. credsStore / credHelpers are not run.

Modes (credentialConfig.mode): ``file`` (path = JSON file, re-read when it changes), ``http`` and
``https`` (GET ``<path>?remote_url=<blob url>``; https with client cert/key and server CA),
``uds`` (GET ``http://localhost/auth?remote_url=<url>`` over the unix socket ``path``). The helper's
answer must be HTTP 200 with ``{"success": true, "data": {"auths": {...}}}``. Any other mode or an
empty path: no credentials.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from .aiohttp_loader import aiohttp

from ..config import CredentialConfig
from ..errors import RemoteError
from .redact import describe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credential:
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:  # never print the password
        return f"Credential(username={self.username!r}, password=***)"


class CredentialError(RemoteError):
    """The credential helper or file could not be used."""


def candidate_keys(url: str) -> list[str]:
    """Upstream's candidate keys for a blob URL: host, host/p1, host/p1/p2, …"""
    u = urllib.parse.urlsplit(url)
    host = u.netloc.rsplit("@", 1)[-1]
    parts = [p for p in u.path.split("/") if p]
    if parts and parts[0] == "v2":
        parts = parts[1:]
    if "blobs" in parts:
        parts = parts[: len(parts) - 1 - parts[::-1].index("blobs")]
    elif "manifests" in parts:
        parts = parts[: len(parts) - 1 - parts[::-1].index("manifests")]
    keys = [host]
    for i in range(len(parts)):
        keys.append(host + "/" + "/".join(parts[: i + 1]))
    return keys


def parse_entry(value: object, where: str) -> Credential | None:
    """One auths value → Credential; None (logged) when unusable."""
    if not isinstance(value, dict):
        log.warning("%s: credential entry is not an object; ignored", where)
        return None
    auth = value.get("auth")
    if isinstance(auth, str) and auth:
        try:
            raw = base64.b64decode(auth, validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            log.warning("%s: 'auth' is not base64 of user:password; ignored", where)
            return None
        user, sep, pw = raw.partition(":")
        if not sep:
            log.warning("%s: 'auth' has no ':' between user and password; ignored", where)
            return None
        return Credential(user, pw)
    user, pw = value.get("username"), value.get("password")
    if isinstance(user, str) and isinstance(pw, str) and (user or pw):
        return Credential(user, pw)
    return None


def parse_auths(obj: object, source: str = "credentials") -> list[tuple[str, Credential]]:
    """`{"auths": {...}}` → [(key, Credential)] in JSON order (unusable entries dropped)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("auths"), dict):
        return []
    out = []
    for key, value in obj["auths"].items():
        cred = parse_entry(value, f"{source}: auths[{key!r}]")
        if cred is not None:
            out.append((key, cred))
    return out


def match_auths(entries: list[tuple[str, Credential]], url: str) -> Credential | None:
    """Upstream matching: first entry (JSON order) whose key equals a candidate key exactly."""
    cands = set(candidate_keys(url))
    for key, cred in entries:
        if key in cands:
            return cred
    return None


def normalize_docker_key(key: str) -> list[str]:
    """~/.docker/config.json key → keys comparable with candidate_keys()."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    k = k.rstrip("/")
    for suffix in ("/v1", "/v2"):
        if k.endswith(suffix):
            k = k[: -len(suffix)]
    out = [k]
    if k in ("index.docker.io", "docker.io"):
        out.append("registry-1.docker.io")
    return out


def match_docker_config(entries: list[tuple[str, Credential]], url: str) -> Credential | None:
    cands = set(candidate_keys(url))
    for key, cred in entries:
        if any(k in cands for k in normalize_docker_key(key)):
            return cred
    return None


def _docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


class _JsonFile:
    """A JSON credential file re-read when its (mtime, size, inode) changes."""

    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple | None = None
        self._entries: list[tuple[str, Credential]] = []

    def entries(self) -> list[tuple[str, Credential]]:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._entries = None, []
            return []
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                with open(self.path, "rb") as f:
                    obj = json.loads(f.read(4 << 20))
                self._entries = parse_auths(obj, self.path)
            except (OSError, ValueError) as e:
                log.warning("cannot read credentials from %s: %s", self.path, e)
                self._entries = []
            self._stamp = stamp
        return self._entries


class CredentialProvider:
    """Looks up the Credential for a blob URL per credentialConfig (+ docker config fallback).

    Results are cached per candidate key for `cache_ttl` seconds; `get(url, refresh=True)` asks
    the source again (used when the registry rejected what we had).
    """

    def __init__(self, cfg: CredentialConfig, *, docker_config: str | None | bool = True,
                 cache_ttl: float = 60.0, user_agent: str = "tcmu-obd"):
        self.cfg = cfg
        self.cache_ttl = cache_ttl
        self.user_agent = user_agent
        self._file = _JsonFile(cfg.path) if cfg.mode == "file" and cfg.path else None
        if docker_config is True:
            docker_config = _docker_config_path()
        self._docker = _JsonFile(docker_config) if docker_config else None
        self._cache: dict[str, tuple[float, Credential | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.lookups = 0  # helper/file consultations (for tests and metrics)

    @property
    def mode(self) -> str:
        return self.cfg.mode if self.cfg.mode in ("file", "http", "https", "uds") and self.cfg.path else ""

    async def get(self, url: str, *, refresh: bool = False) -> Credential | None:
        keys = candidate_keys(url)
        cache_key = keys[-1]
        now = time.monotonic()
        hit = self._cache.get(cache_key)
        if hit is not None and not refresh and now - hit[0] < self.cache_ttl:
            return hit[1]
        self.lookups += 1
        cred = None
        mode = self.mode
        if mode == "file":
            cred = match_auths(self._file.entries(), url)
        elif mode in ("http", "https", "uds"):
            try:
                cred = match_auths(await self._ask_helper(url), url)
            except CredentialError as e:
                log.warning("%s", e)
                cred = None
        if cred is None and self._docker is not None:
            cred = match_docker_config(self._docker.entries(), url)
        self._cache[cache_key] = (now, cred)
        return cred

    def _helper_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            cfg = self.cfg
            if cfg.mode == "uds":
                connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=cfg.path)
            else:
                # a context of our own also for plain http (a redirect may lead to https):
                # aiohttp's default one is built without the CA file (see aiohttp_loader)
                ssl_ctx = ssl.create_default_context(cafile=cfg.server_ca_path or None)
                if cfg.mode == "https" and cfg.client_cert_path:
                    ssl_ctx.load_cert_chain(cfg.client_cert_path, cfg.client_key_path or None)
                connector = aiohttp.TCPConnector(ssl=ssl_ctx)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": self.user_agent})
        return self._session

    def _helper_url(self, url: str) -> str:
        q = urllib.parse.urlencode({"remote_url": url})
        if self.cfg.mode == "uds":
            return f"http://localhost/auth?{q}"
        base = self.cfg.path
        return f"{base}{'&' if '?' in base else '?'}{q}"

    async def _ask_helper(self, url: str) -> list[tuple[str, Credential]]:
        helper = self._helper_url(url)
        where = f"credential helper {self.cfg.mode}:{self.cfg.path}"
        timeout = aiohttp.ClientTimeout(total=max(float(self.cfg.timeout), 0.1))
        try:
            async with self._helper_session().get(helper, timeout=timeout) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise CredentialError(f"{where} answered {resp.status} for {url}", status=resp.status, url=url)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise CredentialError(f"{where} failed for {url}: {describe(e)}", url=url) from e
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise CredentialError(f"{where}: answer is not JSON", url=url) from e
        if not isinstance(obj, dict) or obj.get("success") is not True or not isinstance(obj.get("data"), dict):
            raise CredentialError(f"{where}: answer has no success=true/data (traceId {obj.get('traceId') if isinstance(obj, dict) else None})", url=url)
        return parse_auths(obj["data"], where)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
