"""The test-support registry and fault proxy themselves (so other suites can rely on them)."""

import hashlib
import os
import urllib.error
import urllib.request

import pytest

from tests.support.faultproxy import Fault, fault_proxy, presigned_storage  # noqa: F401
from tests.support.registry import (  # noqa: F401  (fixtures)
    blob_url,
    hello_world,
    push_blob,
    registry,
    registry_htpasswd,
    registry_token,
)

pytestmark = pytest.mark.registry


def _get(url, headers=None):
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30)
        return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, b"", e.headers


def test_hello_world_pushed(hello_world, registry):
    (layer,) = hello_world.layers
    st, body, _ = _get(hello_world.blob_url(layer))
    assert st == 200
    assert body == hello_world.blob_path(layer).read_bytes()
    st, body, _ = _get(f"{registry.url}/v2/{hello_world.repo}/manifests/amd64-converted",
                       {"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert st == 200 and hashlib.sha256(body).hexdigest() == hello_world.manifest_digest.split(":")[1]


def test_push_file_streamed(registry, tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "b").write_bytes(data)
    d = push_blob(registry.url, "support/file", tmp_path / "b")
    assert d == "sha256:" + hashlib.sha256(data).hexdigest()
    assert registry.blob_path(d).read_bytes() == data


def test_auth_registries_refuse_anonymous(registry_htpasswd, registry_token):
    for reg in (registry_htpasswd, registry_token):
        d = push_blob(reg.url, "support/auth", b"secret bytes", auth=reg.auth)
        st, _, h = _get(blob_url(reg.url, "support/auth", d))
        assert st == 401 and h["WWW-Authenticate"]
    assert registry_token.issuer.count >= 1


def test_fault_proxy_and_presigned_storage(registry, fault_proxy, presigned_storage):
    data = os.urandom(100_000)
    d = push_blob(registry.url, "support/proxy", data)
    proxy = fault_proxy(registry.url)
    u = blob_url(proxy.url, "support/proxy", d)
    f = proxy.add(Fault(status=503, headers={"Retry-After": "0"}, times=1))
    assert _get(u)[0] == 503
    assert _get(u)[1] == data
    assert f.hits == 1
    storage = presigned_storage(registry.blob_path)
    proxy2 = fault_proxy(registry.url, storage=storage)
    st, body, _ = _get(blob_url(proxy2.url, "support/proxy", d), {"Range": "bytes=10-19"})
    assert (st, body) == (206, data[10:20])
    assert proxy2.redirects == 1 and storage.auth_violations == []
