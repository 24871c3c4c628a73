"""RegistryClient against the real docker-registry: anonymous, Basic (htpasswd), Bearer, helpers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.config import CredentialConfig
from tcmu_obd.errors import AuthError, RemoteError
from tcmu_obd.remote import RangeNotSatisfiable
from tests.remote.helpers import client, cred_file, file_creds
from tests.support.registry import (  # noqa: F401  (fixtures)
    hello_world,
    push_blob,
    registry,
    registry_factory,
    registry_htpasswd,
    registry_token,
)

pytestmark = pytest.mark.registry

BLOB = random.Random(7).randbytes(3 * 1024 * 1024 + 12345)


@pytest.fixture(scope="module")
def anon_blob(registry):
    d = push_blob(registry.url, "client/anon", BLOB)
    return registry.blob_url("client/anon", d)


async def test_hello_world_layer_every_range(hello_world):
    (layer,) = hello_world.layers
    data = hello_world.blob_path(layer).read_bytes()
    url = hello_world.blob_url(layer)
    async with client() as c:
        assert await c.blob_size(url) == len(data) == hello_world.layer_sizes[0]
        out = bytearray(len(data))
        step = 65536
        await asyncio.gather(*(c.read_range_into(url, off, memoryview(out)[off : off + step])
                               for off in range(0, len(data), step)))
        assert hashlib.sha256(out).hexdigest() == layer.split(":")[1]
        assert c.stats.bytes == len(data) + 1 and c.stats.errors == 0  # +1: blob_size reads bytes=0-0


async def test_read_range_exact_and_small(anon_blob):
    async with client() as c:
        assert await c.read_range(anon_blob, 0, 1) == BLOB[:1]
        assert await c.read_range(anon_blob, len(BLOB) - 7, 7) == BLOB[-7:]
        assert await c.read_range(anon_blob, 1000, 0) == b""
        arr = bytearray(4096)
        await c.read_range_into(anon_blob, 777, arr)  # plain bytearray accepted too
        assert arr == BLOB[777 : 777 + 4096]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranges=st.lists(st.tuples(st.integers(0, len(BLOB) - 1), st.integers(1, 1 << 20)), min_size=1, max_size=6))
def test_random_ranges(anon_blob, ranges):
    async def run():
        async with client() as c:
            for off, ln in ranges:
                ln = min(ln, len(BLOB) - off)
                assert await c.read_range(anon_blob, off, ln) == BLOB[off : off + ln]

    asyncio.run(run())


async def test_progress_reports_a_growing_final_prefix(anon_blob):
    """read_range_into(progress=): each report n means buf[:n] already holds the final bytes."""
    async with client() as c:
        out = bytearray(len(BLOB) - 100)
        seen: list[int] = []

        def progress(n):
            assert out[:n] == BLOB[100 : 100 + n]  # the prefix is final when reported
            seen.append(n)

        await c.read_range_into(anon_blob, 100, memoryview(out), progress=progress)
        assert out == BLOB[100:]
        assert seen == sorted(set(seen)) and seen[-1] == len(out)
        assert len(seen) > 1  # delivered piecewise, not only at the end
        await c.read_range_into(anon_blob, 0, memoryview(bytearray(10)))  # still optional


async def test_blob_size_and_empty_blob(registry, anon_blob):
    empty = push_blob(registry.url, "client/anon", b"")
    async with client() as c:
        assert await c.blob_size(anon_blob) == len(BLOB)
        assert await c.blob_size(registry.blob_url("client/anon", empty)) == 0


async def test_not_found(registry):
    url = registry.blob_url("client/anon", "sha256:" + "0" * 64)
    async with client() as c:
        with pytest.raises(RemoteError, match="blob not found") as ei:
            await c.read_range(url, 0, 10)
        assert ei.value.status == 404 and ei.value.url == url
        with pytest.raises(RemoteError, match="blob not found"):
            await c.blob_size(url)
        assert c.stats.retries == 0


async def test_range_past_end(anon_blob):
    async with client() as c:
        with pytest.raises(RangeNotSatisfiable, match=f"size {len(BLOB)}") as ei:
            await c.read_range(anon_blob, len(BLOB) + 10, 10)
        assert ei.value.status == 416 and ei.value.size == len(BLOB)
        with pytest.raises(RangeNotSatisfiable, match=f"size {len(BLOB)}"):  # straddles the end
            await c.read_range(anon_blob, len(BLOB) - 10, 20)
        assert c.stats.retries == 0
        assert await c.read_range(anon_blob, 0, 5) == BLOB[:5]  # the session still works


async def test_basic_auth_htpasswd(registry_htpasswd, tmp_path):
    reg = registry_htpasswd
    d = push_blob(reg.url, "client/basic", BLOB[:100000], auth=reg.auth)
    url = reg.blob_url("client/basic", d)
    async with client(file_creds(tmp_path, reg, "client/basic")) as c:
        assert await c.read_range(url, 10, 1000) == BLOB[10:1010]
        assert await c.read_range(url, 0, 10) == BLOB[:10]
        assert c.stats.token_requests == 0
    bad = CredentialConfig(mode="file", path=cred_file(tmp_path, {reg.host: {"username": reg.username,
                                                                             "password": "wrong"}}))
    async with client(bad) as c:
        with pytest.raises(AuthError, match="Authentication failed"):
            await c.read_range(url, 0, 10)
    async with client() as c:  # no credentials at all
        with pytest.raises(AuthError, match="Authentication failed"):
            await c.read_range(url, 0, 10)


async def test_bearer_token_cached(registry_token, tmp_path):
    reg = registry_token
    d = push_blob(reg.url, "client/bearer", BLOB, auth=reg.auth)
    url = reg.blob_url("client/bearer", d)
    before = reg.issuer.count
    async with client(file_creds(tmp_path, reg)) as c:
        # many concurrent first reads: one challenge round, one token (single flight)
        got = await asyncio.gather(*(c.read_range(url, off, 50000) for off in range(0, 2_000_000, 100000)))
        assert got == [BLOB[off : off + 50000] for off in range(0, 2_000_000, 100000)]
        assert await c.blob_size(url) == len(BLOB)
        assert c.stats.token_requests == 1
    assert reg.issuer.count - before == 1
    last = reg.issuer.requests[-1]
    assert last.user == reg.username and last.scopes == ["repository:client/bearer:pull"]


async def test_bearer_token_rejected_midway_is_refreshed(registry_token, tmp_path):
    """The registry says 401 to a token we hold as valid (expired/revoked during a long fill)."""
    reg = registry_token
    d = push_blob(reg.url, "client/bearer", BLOB, auth=reg.auth)
    url = reg.blob_url("client/bearer", d)
    async with client(file_creds(tmp_path, reg)) as c:
        assert await c.read_range(url, 0, 100) == BLOB[:100]
        before = reg.issuer.count
        # the cached token dies; the next token issued is bad too only if we asked twice
        key = next(iter(c.auth._tokens))
        c.auth._tokens[key].value = reg.issuer.make_token(["repository:client/bearer:pull"], "x", expired=True)
        out = await asyncio.gather(*(c.read_range(url, off, 65536) for off in range(0, 1 << 20, 65536)))
        assert b"".join(out) == BLOB[: 1 << 20]
        assert reg.issuer.count - before == 1  # one refresh for 16 concurrent 401s
        assert c.stats.auth_refreshes >= 1


async def test_bearer_first_token_expired_then_good(registry_token, tmp_path):
    reg = registry_token
    d = push_blob(reg.url, "client/bearer", BLOB, auth=reg.auth)
    url = reg.blob_url("client/bearer", d)
    reg.issuer.issue_expired(1)
    before = reg.issuer.count
    async with client(file_creds(tmp_path, reg)) as c:
        assert await c.read_range(url, 5, 5) == BLOB[5:10]
        assert c.stats.auth_refreshes == 1 and c.stats.token_requests == 2
    assert reg.issuer.count - before == 2


async def test_bearer_always_rejected_is_auth_error(registry_token, tmp_path):
    reg = registry_token
    d = push_blob(reg.url, "client/bearer", BLOB[:10], auth=reg.auth)
    reg.issuer.issue_expired(5)
    try:
        async with client(file_creds(tmp_path, reg)) as c:
            with pytest.raises(AuthError, match="Authentication failed"):
                await c.read_range(reg.blob_url("client/bearer", d), 0, 5)
    finally:
        reg.issuer.issue_expired(0)


async def test_bearer_token_expiry_respected(registry_token, tmp_path):
    reg = registry_token
    d = push_blob(reg.url, "client/bearer", BLOB[:1000], auth=reg.auth)
    url = reg.blob_url("client/bearer", d)
    async with client(file_creds(tmp_path, reg)) as c:
        await c.read_range(url, 0, 10)
        await c.read_range(url, 0, 10)
        assert c.stats.token_requests == 1
        for tok in c.auth._tokens.values():
            tok.expires_at = 0  # as if expires_in had passed
        await c.read_range(url, 0, 10)
        assert c.stats.token_requests == 2 and c.stats.auth_refreshes == 0  # renewed before use, no 401


async def test_bearer_wrong_password(registry_token, tmp_path):
    reg = registry_token
    d = push_blob(reg.url, "client/bearer", BLOB[:10], auth=reg.auth)
    bad = CredentialConfig(mode="file", path=cred_file(tmp_path, {reg.host: {"username": reg.username,
                                                                             "password": "nope"}}))
    async with client(bad) as c:
        with pytest.raises(AuthError, match="Authentication failed.*token server"):
            await c.read_range(reg.blob_url("client/bearer", d), 0, 5)


async def _helper_server(reg, seen: list[str], unix_path: str | None = None):
    async def auth(request: web.Request):
        seen.append(request.query.get("remote_url", ""))
        return web.json_response({"traceId": "t1", "success": True, "data": {"auths": {
            "unrelated:1": {"username": "x", "password": "y"},
            reg.host: {"auth": __import__("base64").b64encode(f"{reg.username}:{reg.password}".encode()).decode()},
        }}})

    app = web.Application()
    app.router.add_get("/auth", auth)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.UnixSite(runner, unix_path) if unix_path else web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site


@pytest.mark.parametrize("mode", ["uds", "http"])
async def test_credential_helper_modes(registry_htpasswd, tmp_path, mode):
    reg = registry_htpasswd
    d = push_blob(reg.url, "client/helper", BLOB[:5000], auth=reg.auth)
    url = reg.blob_url("client/helper", d)
    seen: list[str] = []
    sock = str(tmp_path / "cred.sock")
    runner, site = await _helper_server(reg, seen, sock if mode == "uds" else None)
    try:
        path = sock if mode == "uds" else f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/auth"
        async with client(CredentialConfig(mode=mode, path=path, timeout=5)) as c:
            assert await c.read_range(url, 100, 100) == BLOB[100:200]
        assert seen == [url]
    finally:
        await runner.cleanup()


async def test_credential_helper_failure_means_no_credentials(registry_htpasswd, tmp_path):
    reg = registry_htpasswd
    d = push_blob(reg.url, "client/helper", BLOB[:10], auth=reg.auth)
    async with client(CredentialConfig(mode="uds", path=str(tmp_path / "absent.sock"), timeout=1)) as c:
        with pytest.raises(AuthError, match="none are configured"):
            await c.read_range(reg.blob_url("client/helper", d), 0, 5)


async def test_ignored_range_small_sliced_big_refused():
    body = os.urandom(5000)

    async def whole(request):
        return web.Response(body=body)  # ignores Range: 200 with everything

    app = web.Application()
    app.router.add_get("/v2/x/blobs/{d}", whole)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v2/x/blobs/sha256:{'1' * 64}"
    try:
        async with client() as c:
            assert await c.read_range(url, 100, 50) == body[100:150]
        from tcmu_obd.remote import RetryPolicy

        async with client(retry=RetryPolicy(ignore_range_limit=1000)) as c:
            with pytest.raises(RemoteError, match="ignored Range"):
                await c.read_range(url, 100, 50)
    finally:
        await runner.cleanup()


async def test_cancelled_reader_does_not_cancel_shared_token_fetch(registry_factory, tmp_path):
    reg = registry_factory(auth="token")
    d = push_blob(reg.url, "client/cancel", BLOB[:100000], auth=reg.auth)
    url = reg.blob_url("client/cancel", d)
    reg.issuer.delay = 0.3
    before = reg.issuer.count
    async with client(file_creds(tmp_path, reg)) as c:
        a = asyncio.create_task(c.read_range(url, 0, 100))
        b = asyncio.create_task(c.read_range(url, 100, 100))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while reg.issuer.count == before:  # the token request has reached the issuer
            assert loop.time() < deadline, "no token request"
            await asyncio.sleep(0.005)
        a.cancel()
        assert await b == BLOB[100:200]
        with pytest.raises(asyncio.CancelledError):
            await a
        assert await c.read_range(url, 0, 100) == BLOB[:100]
        assert c.stats.token_requests == 1
    assert reg.issuer.count - before == 1
