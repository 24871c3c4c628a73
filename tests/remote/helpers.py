"""Shared bits for the remote/ tests: client construction with isolated credentials."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path

from tcmu_obd.config import CredentialConfig, GlobalConfig, Mirror
from tcmu_obd.remote import CredentialProvider, RegistryClient, RetryPolicy, Timeouts

FAST_RETRY = RetryPolicy(attempts=4, backoff_initial=0.001, backoff_max=0.01)


def cred_file(tmp_path: Path, auths: dict) -> str:
    p = tmp_path / "cred.json"
    p.write_text(json.dumps({"auths": auths}))
    return str(p)


@asynccontextmanager
async def client(cred: CredentialConfig | None = None, *, mirrors=(), retry: RetryPolicy = FAST_RETRY,
                 timeouts: Timeouts | None = None, max_connections: int = 64):
    cfg = GlobalConfig(credential_config=cred or CredentialConfig(mode="none"),
                       mirrors=tuple(Mirror(url=m) if isinstance(m, str) else m for m in mirrors))
    creds = CredentialProvider(cfg.effective_credentials, docker_config=False)
    c = RegistryClient(cfg, max_connections=max_connections, timeouts=timeouts, retry=retry, credentials=creds)
    try:
        yield c
    finally:
        await c.aclose()


def file_creds(tmp_path: Path, reg, repo: str | None = None) -> CredentialConfig:
    key = reg.host if repo is None else f"{reg.host}/{repo}"
    return CredentialConfig(mode="file", path=cred_file(tmp_path, {key: {"username": reg.username,
                                                                           "password": reg.password}}))
