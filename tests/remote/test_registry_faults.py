"""RegistryClient through the fault proxy: redirects to a storage host, retries, resets, mirrors,
timeouts, cancellation. Real docker-registry behind; counts, never wall time."""

from __future__ import annotations

import asyncio
import random

import pytest

from tcmu_obd.config import Mirror
from tcmu_obd.errors import AuthError, RemoteError, RemoteTimeout
from tcmu_obd.remote import RetryPolicy, Timeouts
from tests.remote.helpers import client
from tests.support.faultproxy import Fault, PresignedStorage, fault_proxy  # noqa: F401
from tests.support.registry import blob_url, push_blob, registry, registry_token  # noqa: F401

pytestmark = pytest.mark.registry

BLOB = random.Random(11).randbytes(2 * 1024 * 1024 + 333)
REPO = "faults/blob"


@pytest.fixture(scope="module")
def digest(registry):
    return push_blob(registry.url, REPO, BLOB)


@pytest.fixture(scope="module")
def token_digest(registry_token):
    return push_blob(registry_token.url, REPO, BLOB, auth=registry_token.auth)


async def wait_for(cond, what: str, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_redirect_to_storage_without_authorization(registry_token, token_digest, fault_proxy, tmp_path):
    reg = registry_token
    storage = PresignedStorage(reg.blob_path)
    proxy = fault_proxy(reg.url, storage=storage)
    url = blob_url(proxy.url, REPO, token_digest)
    async with client(_proxy_creds(tmp_path, reg, proxy)) as c:
        parts = await asyncio.gather(*(c.read_range(url, off, 262144) for off in range(0, 2 << 20, 262144)))
        assert b"".join(parts) == BLOB[: 2 << 20]
        assert await c.blob_size(url) == len(BLOB)
        assert c.stats.token_requests == 1
    data_gets = [e for e in storage.log if e.method == "GET"]
    assert len(data_gets) >= 8 and all(e.status == 200 for e in data_gets)
    assert storage.auth_violations == []
    assert all("Authorization" not in e.headers for e in storage.log)
    # concurrent first reads may each resolve the location; after that it is cached
    assert c.stats.redirects == proxy.redirects <= 8
    async with client(_proxy_creds(tmp_path, reg, proxy)) as c:
        await c.read_range(url, 0, 10)
        before = proxy.redirects
        for off in range(0, 1 << 20, 262144):
            assert await c.read_range(url, off, 1000) == BLOB[off : off + 1000]
        assert proxy.redirects == before


def _proxy_creds(tmp_path, reg, proxy):
    from tcmu_obd.config import CredentialConfig
    from tests.remote.helpers import cred_file

    return CredentialConfig(mode="file", path=cred_file(tmp_path, {
        proxy.host: {"username": reg.username, "password": reg.password}}))


async def test_expired_presigned_url_is_reresolved(registry, digest, fault_proxy):
    storage = PresignedStorage(registry.blob_path)
    proxy = fault_proxy(registry.url, storage=storage)
    url = blob_url(proxy.url, REPO, digest)
    async with client() as c:
        assert await c.read_range(url, 0, 1000) == BLOB[:1000]
        assert proxy.redirects == 1
        storage.expire_all()  # every URL handed out so far now answers 403 "Request has expired"
        assert await c.read_range(url, 5000, 1000) == BLOB[5000:6000]
        assert proxy.redirects == 2 and c.stats.reresolves == 1
        assert [e.status for e in storage.log] == [200, 403, 200]
    assert storage.auth_violations == []


@pytest.mark.parametrize("status", [503, 429])
async def test_retry_after_honoured(registry, digest, fault_proxy, status):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    f = proxy.add(Fault(status=status, headers={"Retry-After": "0"}, times=2))
    async with client() as c:
        assert await c.read_range(url, 100, 100) == BLOB[100:200]
        assert f.hits == 2 and proxy.count() == 3 and c.stats.retries == 2


async def test_retry_after_exhausted(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(status=429, headers={"Retry-After": "0"}, times=-1))
    async with client(retry=RetryPolicy(attempts=3, backoff_initial=0.001)) as c:
        with pytest.raises(RemoteError, match="Too many requests") as ei:
            await c.read_range(url, 0, 10)
        assert ei.value.status == 429 and proxy.count() == 3 and ei.value.url == url


async def test_5xx_backoff_then_success(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(status=500, times=2))
    proxy.add(Fault(status=502, times=1))  # consulted once the first is used up
    async with client() as c:
        assert await c.read_range(url, 0, 10) == BLOB[:10]
        assert proxy.count() == 4 and c.stats.retries == 3


async def test_connection_reset_mid_body_fetches_remainder(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    f = proxy.add(Fault(kind="reset", after_bytes=300_000, times=1))
    async with client() as c:
        off, n = 1000, 1 << 20
        assert await c.read_range(url, off, n) == BLOB[off : off + n]
    assert f.hits == 1
    gets = [e for e in proxy.log if e.method == "GET"]
    assert len(gets) == 2
    first = gets[0].headers["Range"]
    second = gets[1].headers["Range"]
    assert first == f"bytes={off}-{off + n - 1}"
    # the retry asks only for what is missing (at least the bytes that got through are skipped)
    start2 = int(second.split("=")[1].split("-")[0])
    assert off < start2 <= off + 300_000 and second.endswith(f"-{off + n - 1}")


async def test_repeated_resets_give_up_with_error(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(kind="reset", after_bytes=0, times=-1))
    async with client(retry=RetryPolicy(attempts=3, backoff_initial=0.001)) as c:
        with pytest.raises(RemoteError, match=f"{url}.*after 3 attempts"):
            await c.read_range(url, 0, 100_000)


async def test_injected_401_mid_fill_refreshes_token(registry_token, token_digest, fault_proxy, tmp_path):
    reg = registry_token
    proxy = fault_proxy(reg.url)
    url = blob_url(proxy.url, REPO, token_digest)
    async with client(_proxy_creds(tmp_path, reg, proxy)) as c:
        out = bytearray(len(BLOB))
        step = 131072
        for off in range(0, 1 << 20, step):  # the first half of a long fill
            await c.read_range_into(url, off, memoryview(out)[off : off + step])
        assert c.stats.token_requests == 1
        f = proxy.add(Fault(kind="unauthorized", times=1))
        for off in range(1 << 20, len(BLOB), step):
            await c.read_range_into(url, off, memoryview(out)[off : off + step])
        assert out == BLOB
        assert f.hits == 1 and c.stats.token_requests == 2 and c.stats.auth_refreshes == 1


async def test_401_twice_after_refresh_is_auth_error(registry_token, token_digest, fault_proxy, tmp_path):
    reg = registry_token
    proxy = fault_proxy(reg.url)
    url = blob_url(proxy.url, REPO, token_digest)
    proxy.add(Fault(kind="unauthorized", times=-1))
    async with client(_proxy_creds(tmp_path, reg, proxy)) as c:
        with pytest.raises(AuthError, match="Authentication failed"):
            await c.read_range(url, 0, 10)


async def test_injected_416(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(status=416, headers={"Content-Range": f"bytes */{len(BLOB)}"}))
    async with client() as c:
        with pytest.raises(RemoteError, match=f"past the end of the blob \\(size {len(BLOB)}\\)"):
            await c.read_range(url, 0, 10)
        assert proxy.count() == 1


async def test_mirror_first_then_fallback_to_origin(registry, digest, fault_proxy):
    origin = fault_proxy(registry.url)
    mirror = fault_proxy(registry.url)
    url = blob_url(origin.url, REPO, digest)
    async with client(mirrors=[mirror.url], retry=RetryPolicy(attempts=2, backoff_initial=0.001)) as c:
        assert await c.read_range(url, 0, 100) == BLOB[:100]
        assert mirror.count() == 1 and origin.count() == 0
        mirror.add(Fault(status=503, times=-1))
        assert await c.read_range(url, 100, 100) == BLOB[100:200]
        assert mirror.count() == 3 and origin.count() == 1 and c.stats.mirror_fallbacks == 1
        # the failed mirror is skipped for a while
        assert await c.read_range(url, 200, 100) == BLOB[200:300]
        assert mirror.count() == 3 and origin.count() == 2


async def test_mirror_missing_blob_falls_back(registry, digest, fault_proxy):
    origin = fault_proxy(registry.url)
    mirror = fault_proxy(registry.url)
    mirror.add(Fault(status=404, times=-1))
    url = blob_url(origin.url, REPO, digest)
    async with client(mirrors=[Mirror(url=mirror.url)]) as c:
        assert await c.read_range(url, 0, 100) == BLOB[:100]
        assert mirror.count() == 1 and origin.count() == 1


async def test_sock_read_timeout_is_remote_timeout(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(kind="delay", delay=0.6, times=-1))
    async with client(timeouts=Timeouts(sock_read=0.1), retry=RetryPolicy(attempts=2, backoff_initial=0.001)) as c:
        with pytest.raises(RemoteTimeout) as ei:
            await c.read_range(url, 0, 10)
        assert isinstance(ei.value, TimeoutError) and url in str(ei.value)


async def test_slow_body_still_complete(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(kind="slow", chunk=65536, delay=0.002))
    async with client() as c:
        assert await c.read_range(url, 0, 1 << 20) == BLOB[: 1 << 20]


async def test_cancelled_read_releases_its_connection(registry, digest, fault_proxy):
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(kind="slow", chunk=16384, delay=0.05))
    async with client(max_connections=1) as c:
        buf = bytearray(1 << 20)
        task = asyncio.create_task(c.read_range_into(url, 0, memoryview(buf)))
        await wait_for(lambda: c.stats.bytes > 0, "the body to start arriving")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(c._session.connector._acquired) == 0
        # with max_connections=1 the next read only works if the connection was given back
        assert await asyncio.wait_for(c.read_range(url, 10, 10), 30) == BLOB[10:20]


async def test_p2p_agent_used_first_and_skipped_when_down(registry, digest):
    """p2pConfig: requests go to <address>/<blob url> (as upstream); a dead agent falls back."""
    from aiohttp import ClientSession, web

    from tcmu_obd.config import GlobalConfig, P2PConfig
    from tcmu_obd.remote import CredentialProvider, RegistryClient
    from tests.remote.helpers import FAST_RETRY

    seen: list[str] = []

    async def agent(request: web.Request):
        target = request.match_info["tail"]
        seen.append(target)
        async with ClientSession() as s:
            async with s.get(target, headers={"Range": request.headers["Range"]}) as up:
                return web.Response(status=up.status, body=await up.read(),
                                    headers={"Content-Range": up.headers.get("Content-Range", "")})

    app = web.Application()
    app.router.add_get("/accelerator/{tail:.*}", agent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url = registry.blob_url(REPO, digest)
    try:
        for address, works in ((f"http://127.0.0.1:{port}/accelerator", True),
                               (f"http://127.0.0.1:{port}/down", False)):
            cfg = GlobalConfig(p2p_config=P2PConfig(enable=True, address=address))
            c = RegistryClient(cfg, retry=FAST_RETRY, credentials=CredentialProvider(cfg.credential_config,
                                                                                  docker_config=False))
            try:
                seen.clear()
                assert await c.read_range(url, 1, 100) == BLOB[1:101]
                assert seen == ([url] if works else [])
                assert c.stats.mirror_fallbacks == (0 if works else 1)
            finally:
                await c.aclose()
    finally:
        await runner.cleanup()


async def test_cancel_at_random_points_never_leaks(registry, digest, fault_proxy):
    """Cancel reads at assorted moments (connect, headers, mid-body); the pool stays whole and
    later reads are correct. The sleeps only pick cancel points; nothing waits on them."""
    proxy = fault_proxy(registry.url)
    url = blob_url(proxy.url, REPO, digest)
    proxy.add(Fault(kind="slow", chunk=32768, delay=0.002, times=-1))
    rnd = random.Random(5)
    async with client(max_connections=2) as c:
        for i in range(12):
            off = rnd.randrange(0, len(BLOB) - 300_000)
            task = asyncio.create_task(c.read_range(url, off, 300_000))
            await asyncio.sleep(rnd.choice([0, 0, 0.001, 0.005, 0.02, 0.05]))
            task.cancel()
            try:
                assert await task == BLOB[off : off + 300_000]  # finished before the cancel landed
            except asyncio.CancelledError:
                pass
            assert len(c._session.connector._acquired) == 0
        assert await c.read_range(url, 12345, 100_000) == BLOB[12345:112345]
