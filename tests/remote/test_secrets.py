"""Credentials never reach logs or error messages; TLS verification is per-registry opt-out."""

from __future__ import annotations

import base64
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tcmu_obd.config import CredentialConfig, GlobalConfig, Mirror
from tcmu_obd.errors import AuthError, RemoteError
from tcmu_obd.remote import CredentialProvider, RegistryClient
from tcmu_obd.remote.redact import describe, redact_url
from tests.remote.helpers import FAST_RETRY, client, cred_file
from tests.support.registry import push_blob, registry_token  # noqa: F401  (fixtures)

SECRET = "hunter2-s3cret"


def _secrets(user: str, password: str) -> list[str]:
    return [password, base64.b64encode(f"{user}:{password}".encode()).decode()]


def _assert_clean(text: str, secrets: list[str]) -> None:
    for s in secrets:
        assert s not in text, f"secret {s[:4]}… leaked: {text[:300]}"


@pytest.mark.registry
async def test_rejected_password_is_not_logged(registry_token, tmp_path, caplog):
    reg = registry_token
    d = push_blob(reg.url, "secrets/bearer", b"x" * 100, auth=reg.auth)
    bad = CredentialConfig(mode="file", path=cred_file(tmp_path, {reg.host: {"username": reg.username,
                                                                             "password": SECRET}}))
    caplog.set_level(logging.DEBUG)
    async with client(bad) as c:
        with pytest.raises(AuthError) as ei:
            await c.read_range(reg.blob_url("secrets/bearer", d), 0, 5)
    _assert_clean(str(ei.value) + repr(ei.value.args) + caplog.text, _secrets(reg.username, SECRET))


async def _serve(routes) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, handler in routes:
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_token_server_redirect_loop_does_not_leak_basic_auth(tmp_path, caplog):
    """A token endpoint that redirects forever: aiohttp's TooManyRedirects repr carries the
    request headers, our Authorization: Basic among them. (A fake server: no real registry's
    token service misbehaves like this.)"""
    base = {}

    async def blob(request):
        return web.Response(status=401, headers={
            "WWW-Authenticate": f'Bearer realm="{base["url"]}/token",service="reg",scope="repository:x:pull"'})

    async def token(request):
        raise web.HTTPFound(f"{base['url']}/token?again=1")

    runner, base["url"] = await _serve([("/v2/x/blobs/{digest}", blob), ("/token", token)])
    host = base["url"].split("//")[1]
    cred = CredentialConfig(mode="file", path=cred_file(tmp_path, {host: {"username": "bob", "password": SECRET}}))
    caplog.set_level(logging.DEBUG)
    try:
        async with client(cred) as c:
            with pytest.raises(RemoteError) as ei:
                await c.read_range(f"{base['url']}/v2/x/blobs/sha256:{'0' * 64}", 0, 5)
    finally:
        await runner.cleanup()
    assert "TooManyRedirects" in str(ei.value)  # the cause is still named
    _assert_clean(str(ei.value) + caplog.text, _secrets("bob", SECRET))


async def test_userinfo_in_blob_url_is_not_echoed(caplog):
    async def missing(request):
        return web.Response(status=404)

    runner, base = await _serve([("/v2/x/blobs/{digest}", missing)])
    url = base.replace("http://", f"http://bob:{SECRET}@") + f"/v2/x/blobs/sha256:{'0' * 64}"
    caplog.set_level(logging.DEBUG)
    try:
        async with client() as c:
            with pytest.raises(RemoteError, match="not found") as ei:
                await c.read_range(url, 0, 5)
    finally:
        await runner.cleanup()
    _assert_clean(str(ei.value) + str(ei.value.url) + caplog.text, [SECRET])


def test_describe_drops_headers_and_userinfo():
    ri = RequestInfo(URL(f"https://bob:{SECRET}@h/t?sig=abc"), "GET",
                     CIMultiDictProxy(CIMultiDict({"Authorization": "Basic " + _secrets("bob", SECRET)[1]})),
                     URL(f"https://bob:{SECRET}@h/t?X-Amz-Signature=abc"))
    text = describe(aiohttp.TooManyRedirects(ri, (), status=302, message="Found"))
    assert text == "TooManyRedirects: 302 Found (https://h/t?…)"
    assert redact_url(f"https://u:{SECRET}@s3.example:9000/b/k?X-Amz-Signature=abc") == "https://s3.example:9000/b/k?…"
    assert describe(OSError(f"connect to http://u:{SECRET}@h failed")) == "OSError: connect to http://***@h failed"


def test_tls_verification_opt_out_is_per_registry():
    """Sans-IO: an insecure mirror skips verification for its own host only; every other
    host (other mirrors, the origin, token realms) gets the verifying default context."""
    cfg = GlobalConfig(mirrors=(Mirror(url="https://mirror-a:5000", insecure=True), Mirror(url="https://mirror-b")))
    c = RegistryClient(cfg, retry=FAST_RETRY, credentials=CredentialProvider(cfg.credential_config,
                                                                              docker_config=False))
    assert c._ssl_for("https://mirror-a:5000/v2/x/blobs/d") is False
    for url in ("https://mirror-b/v2/x/blobs/d", "https://origin.example/v2/x/blobs/d", "https://mirror-a/v2/x"):
        ctx = c._ssl_for(url)
        assert ctx.verify_mode.name == "CERT_REQUIRED" and ctx.check_hostname
    assert GlobalConfig().mirrors == () and Mirror().insecure is False  # on unless explicitly disabled
