"""Which HTTP proxy a request goes through: `http_proxy` / `https_proxy` / `no_proxy`.

The rules are the ones curl, urllib and aiohttp's `trust_env` follow: the proxy variable of the
URL's scheme (lower case wins over upper case), unless `no_proxy` names the host (urllib's
matching: domain suffixes, `host:port`, `*` for every host). The registry client decides once per scheme and host, and
passes the answer with each request: aiohttp's `trust_env` would look the environment (and
~/.netrc) up again in a worker thread for every request, two thread round trips before each
range GET leaves (~0.2 ms each, 126 of them queued ahead of a fill's first burst).

Credentials in a proxy URL (`http://user:pass@proxy:3128`) are sent to the proxy only.
"""

from __future__ import annotations

import urllib.parse
from typing import Mapping, NamedTuple


class Proxy(NamedTuple):
    url: str  # without credentials
    username: str | None = None
    password: str | None = None


def _variables(environ: Mapping[str, str]) -> dict[str, str]:
    """scheme -> value of the *_proxy variables that are set (lower case wins)."""
    found: dict[str, str] = {}
    for key in sorted(environ, key=lambda k: k.islower()):  # upper case first, lower case overrides
        if key.lower().endswith("_proxy") and environ[key]:
            found[key.lower()[: -len("_proxy")]] = environ[key]
    return found


def proxy_for(url: str, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy `url` goes through under `environ`, or None for a direct connection."""
    variables = _variables(environ)
    parts = urllib.parse.urlsplit(url)
    value = variables.get(parts.scheme)
    if not value:
        return None
    from urllib.request import proxy_bypass_environment  # only when a proxy is set (~20 ms to import)

    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    if proxy_bypass_environment(host, variables):
        return None
    if "://" not in value:  # `proxy:3128`, as curl accepts it
        value = "http://" + value
    p = urllib.parse.urlsplit(value)
    if p.username is None:
        return Proxy(value)
    netloc = p.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if p.port is not None:
        netloc += f":{p.port}"
    bare = urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))
    return Proxy(bare, urllib.parse.unquote(p.username), urllib.parse.unquote(p.password or ""))
