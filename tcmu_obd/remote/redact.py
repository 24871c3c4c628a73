"""Keeping secrets out of error messages and logs.

A blob URL can carry userinfo (``https://user:pass@host/...``), a presigned storage location
carries its signature in the query, and aiohttp's exception reprs include the request headers
(``Authorization: Basic ...``) and the proxy's credentials. Every message built from a URL or
an aiohttp exception goes through `redact_url` / `describe` first.
"""

from __future__ import annotations

import urllib.parse

from .aiohttp_loader import aiohttp

from ..errors import redact_userinfo


def redact_url(url: object) -> str:
    """`url` without userinfo, and with the query (presigned signatures, tokens) elided."""
    text = str(url)
    try:
        u = urllib.parse.urlsplit(text)
    except ValueError:
        return redact_userinfo(text)
    netloc = u.netloc.rpartition("@")[2]
    query = "…" if u.query else ""
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, query, ""))


def describe(exc: BaseException) -> str:
    """A one-line description of an exception that is safe to log: never its repr (which for
    aiohttp errors holds request headers and proxy credentials)."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        where = redact_url(exc.request_info.real_url) if exc.request_info is not None else ""
        return f"{name}: {exc.status} {exc.message or ''}".rstrip() + (f" ({where})" if where else "")
    text = str(exc)
    return redact_userinfo(f"{name}: {text}" if text else name)
