"""Which URLs a blob read tries, in order: mirrors, the P2P agent, then the origin.

Pure (no I/O, no aiohttp) so the fetch tool can learn the first host to connect to before the
HTTP client is even imported (see preconnect.py).
"""

from __future__ import annotations

import urllib.parse
from typing import Callable, NamedTuple

from ..config import GlobalConfig


class Endpoint(NamedTuple):
    url: str  # what the request is about (auth and redirects are keyed by it)
    via: str | None  # URL prefix the request goes through (p2pConfig.address), else None
    penalty_key: str | None  # mirror / agent that can be skipped after a failure; None = origin

    @property
    def connect_url(self) -> str:
        """The URL whose host the TCP connection goes to."""
        return self.via or self.url


def rebase(url: str, base: str) -> str:
    """`url` with scheme://host (and a path prefix) taken from `base`."""
    u = urllib.parse.urlsplit(url)
    b = urllib.parse.urlsplit(base)
    path = b.path.rstrip("/") + u.path
    return urllib.parse.urlunsplit((b.scheme, b.netloc, path, u.query, ""))


def host_of(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def endpoints(config: GlobalConfig, blob_url: str, skipped: Callable[[str], bool] = lambda key: False) -> list[Endpoint]:
    """Mirrors, then the P2P agent (upstream sends ``<address>/<actual url>``), then the origin,
    which is never skipped. `skipped(key)` is true for a mirror or agent in its penalty time."""
    out = [Endpoint(rebase(blob_url, m.url), None, m.url) for m in config.mirrors if not skipped(m.url)]
    p2p = config.p2p_config
    if p2p.enable and p2p.address and not skipped(p2p.address):
        out.append(Endpoint(blob_url, p2p.address.rstrip("/") + "/", p2p.address))
    out.append(Endpoint(blob_url, None, None))
    return out
