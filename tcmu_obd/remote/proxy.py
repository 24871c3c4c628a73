"""Which HTTP proxy a request goes through: `http_proxy` / `https_proxy` / `no_proxy`.

urllib's rules (`urllib.request.getproxies_environment` and `proxy_bypass_environment`, the
ones aiohttp's `trust_env` applies too): the proxy variable of the URL's scheme, lower case
winning over upper case, unless `no_proxy` names the host (domain suffixes, `host:port`, `*`
for every host). The registry client decides once per scheme and host and passes the answer
with each request: `trust_env` looked the environment (and ~/.netrc) up again in a worker
thread for every request, two thread round trips before each range GET left (128 of them
queued ahead of a fill's first burst of 64).

Credentials in a proxy URL (`http://user:pass@proxy:3128`) are sent to the proxy only.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import NamedTuple


class Proxy(NamedTuple):
    url: str  # without credentials
    username: str | None = None
    password: str | None = None


def proxy_for(url: str) -> Proxy | None:
    """The proxy `url` goes through under the environment, or None for a direct connection."""
    if not any(value and name[-6:].lower() == "_proxy" for name, value in os.environ.items()):
        return None  # the usual case, decided without importing urllib.request (~20 ms)
    from urllib.request import getproxies_environment, proxy_bypass_environment

    proxies = getproxies_environment()
    parts = urllib.parse.urlsplit(url)
    value = proxies.get(parts.scheme)
    if not value:
        return None
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    if proxy_bypass_environment(host, proxies):
        return None
    if "://" not in value:  # `proxy:3128`, as curl accepts it
        value = "http://" + value
    p = urllib.parse.urlsplit(value)
    if p.username is None:
        return Proxy(value)
    # the netloc after its userinfo, as written (brackets and port included), as redact_url does
    bare = urllib.parse.urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, p.query, p.fragment))
    return Proxy(bare, urllib.parse.unquote(p.username), urllib.parse.unquote(p.password or ""))
