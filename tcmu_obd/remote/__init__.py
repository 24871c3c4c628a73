"""remote/: one aiohttp session to OCI registries — auth, token refresh, redirects, mirrors, ranged GETs.

Never priority or cache policy (that is the scheduler's). See docs/registry.md.
"""

from .auth import Authenticator, parse_challenge, repository_of
from .credentials import (
    Credential,
    CredentialProvider,
    candidate_keys,
    match_auths,
    match_docker_config,
    parse_auths,
)
from .registry import (
    ClientStats,
    RangeNotSatisfiable,
    RegistryClient,
    RemoteBlob,
    RetryPolicy,
    Timeouts,
)

__all__ = [
    "Authenticator",
    "ClientStats",
    "Credential",
    "CredentialProvider",
    "RangeNotSatisfiable",
    "RegistryClient",
    "RemoteBlob",
    "RetryPolicy",
    "Timeouts",
    "candidate_keys",
    "match_auths",
    "match_docker_config",
    "parse_auths",
    "parse_challenge",
    "repository_of",
]
