"""remote/: one aiohttp session to OCI registries — auth, token refresh, redirects, mirrors, ranged GETs.

Never priority or cache policy (that is the scheduler's). See docs/registry.md.

The names below are loaded on first use, so that `remote.endpoints` and `remote.preconnect`
can run before aiohttp is imported (see preconnect.py).
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Authenticator": "auth",
    "parse_challenge": "auth",
    "repository_of": "auth",
    "Credential": "credentials",
    "CredentialProvider": "credentials",
    "candidate_keys": "credentials",
    "match_auths": "credentials",
    "match_docker_config": "credentials",
    "parse_auths": "credentials",
    "ClientStats": "registry",
    "RangeNotSatisfiable": "registry",
    "RegistryClient": "registry",
    "RemoteBlob": "registry",
    "RetryPolicy": "registry",
    "Timeouts": "registry",
})
