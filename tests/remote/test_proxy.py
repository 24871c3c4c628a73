"""HTTP(S)_PROXY / NO_PROXY: the rule (pure) and blob reads through a real forward proxy
(Debian's tinyproxy) in front of the real docker-registry."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess

import pytest

from tcmu_obd.errors import AuthError
from tcmu_obd.remote.proxy import Proxy, proxy_for
from tests.remote.helpers import client
from tests.support.registry import free_port, push_blob, registry, wait_until  # noqa: F401  (fixture)

BLOB = random.Random(12).randbytes(1024 * 1024 + 77)


@pytest.fixture
def clean_proxy_env(monkeypatch):
    """No proxy setting from the environment the tests run in (nor a CGI REQUEST_METHOD, under
    which urllib ignores http_proxy)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("env,url,expect", [
    ({}, "http://reg:5000/v2/x", None),
    ({"HTTP_PROXY": "http://proxy:3128"}, "http://reg:5000/v2/x", Proxy("http://proxy:3128")),
    ({"http_proxy": "http://proxy:3128"}, "http://reg:5000/v2/x", Proxy("http://proxy:3128")),
    ({"HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2"}, "http://reg/v2/x", Proxy("http://lower:2")),
    ({"HTTP_PROXY": "http://proxy:3128"}, "https://reg/v2/x", None),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "https://reg/v2/x", Proxy("http://proxy:3128")),
    ({"HTTPS_PROXY": "proxy:3128"}, "https://reg/v2/x", Proxy("http://proxy:3128")),
    ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "reg"}, "https://reg/v2/x", None),
    ({"HTTPS_PROXY": "http://proxy:3128", "no_proxy": ".example.com"}, "https://a.example.com/v2", None),
    ({"HTTPS_PROXY": "http://proxy:3128", "no_proxy": "*"}, "https://reg/v2/x", None),
    ({"HTTP_PROXY": "http://proxy:3128", "no_proxy": "reg:5000"}, "http://reg:5000/v2/x", None),
    ({"HTTP_PROXY": "http://proxy:3128", "no_proxy": "reg:5001"}, "http://reg:5000/v2/x", Proxy("http://proxy:3128")),
    ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "other"}, "https://reg/v2/x", Proxy("http://proxy:3128")),
    ({"HTTP_PROXY": ""}, "http://reg/v2/x", None),
    ({"HTTP_PROXY": "http://u%40corp:p%3Aw@proxy:3128"}, "http://reg/v2/x", Proxy("http://proxy:3128", "u@corp", "p:w")),
    ({"HTTP_PROXY": "http://u@[fd00::1]:3128"}, "http://reg/v2/x", Proxy("http://[fd00::1]:3128", "u", "")),
])
def test_proxy_follows_the_environment(clean_proxy_env, env, url, expect):
    for name, value in env.items():
        clean_proxy_env.setenv(name, value)
    assert proxy_for(url) == expect


@pytest.fixture
def tinyproxy(tmp_path):
    """Start tinyproxy on a free loopback port; yields a function that returns (url, log path)
    for a proxy with optional Basic credentials."""
    exe = shutil.which("tinyproxy")
    assert exe, "tinyproxy is not installed (scripts/setup.sh installs it)"
    procs = []

    def start(credentials: tuple[str, str] | None = None):
        port = free_port()
        log = tmp_path / f"tinyproxy-{port}.log"
        conf = tmp_path / f"tinyproxy-{port}.conf"
        lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 60", f'LogFile "{log}"', "LogLevel Info",
                 "MaxClients 100", "Allow 127.0.0.1"]
        if credentials:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        conf.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)

        def accepting():
            assert proc.poll() is None, f"tinyproxy exited {proc.returncode}: {log.read_text() if log.exists() else ''}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(accepting, 10, "tinyproxy to accept connections")
        return f"http://127.0.0.1:{port}", log

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def _proxied_requests(log, blob_path: str) -> int:
    return sum(1 for line in log.read_text().splitlines() if "Request" in line and blob_path in line)


async def _read(url: str, size: int) -> bytes:
    out = bytearray(size)
    async with client() as c:
        step = -(-size // 3)
        for off in range(0, size, step):
            await c.read_range_into(url, off, memoryview(out)[off:off + step])
    return bytes(out)


async def test_blob_reads_go_through_the_proxy(registry, tinyproxy, clean_proxy_env):  # noqa: F811
    digest = push_blob(registry.url, "proxy/blob", BLOB)
    url = registry.blob_url("proxy/blob", digest)
    proxy, log = tinyproxy()
    clean_proxy_env.setenv("HTTP_PROXY", proxy)
    assert await _read(url, len(BLOB)) == BLOB
    assert _proxied_requests(log, digest) == 3


async def test_no_proxy_goes_direct(registry, tinyproxy, clean_proxy_env):  # noqa: F811
    digest = push_blob(registry.url, "proxy/direct", BLOB)
    url = registry.blob_url("proxy/direct", digest)
    proxy, log = tinyproxy()
    clean_proxy_env.setenv("HTTP_PROXY", proxy)
    clean_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    assert await _read(url, len(BLOB)) == BLOB
    assert _proxied_requests(log, digest) == 0


async def test_proxy_credentials_go_to_the_proxy(registry, tinyproxy, clean_proxy_env):  # noqa: F811
    digest = push_blob(registry.url, "proxy/auth", BLOB)
    url = registry.blob_url("proxy/auth", digest)
    proxy, log = tinyproxy(("obd", "s3cret"))
    clean_proxy_env.setenv("HTTP_PROXY", proxy.replace("http://", "http://obd:s3cret@"))
    assert await _read(url, len(BLOB)) == BLOB
    assert _proxied_requests(log, digest) == 3

    clean_proxy_env.setenv("HTTP_PROXY", proxy.replace("http://", "http://obd:wrong@"))
    with pytest.raises(AuthError) as e:
        await _read(url, len(BLOB))
    # tinyproxy refuses with 401 and its own WWW-Authenticate (others send 407): either way
    # the error says the proxy was in the way, and does not repeat the password
    assert e.value.status in (401, 407)
    assert f"proxy {proxy}" in str(e.value)
    assert "wrong" not in str(e.value)
