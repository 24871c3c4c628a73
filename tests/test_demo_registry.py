"""The demo's registries: Range semantics of the in-process one (also read by the product's
RegistryClient), and docker-registry start + push + ranged read when it is installed."""

from __future__ import annotations

import os

import aiohttp
import pytest

from tcmu_obd.config import GlobalConfig
from tcmu_obd.demo.registry import DockerRegistry, InProcessRegistry, find_docker_registry, parse_range
from tcmu_obd.remote.registry import RegistryClient


@pytest.mark.parametrize("header, expect", [
    (None, None),
    ("", None),
    ("bytes=0-99", (0, 100)),
    ("bytes=10-", (10, 1000)),
    ("bytes=990-5000", (990, 1000)),
    ("bytes=-10", (990, 1000)),
    ("bytes=-5000", (0, 1000)),
    ("bytes=1000-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=5-2", None),  # invalid: ignored, whole blob
    ("bytes=0-1,5-6", None),  # multi-range: ignored
    ("items=0-1", None),
])
def test_parse_range(header, expect):
    assert parse_range(header, 1000) == expect


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


async def test_in_process_registry_range_semantics(blob):
    path, data = blob
    reg = await InProcessRegistry().start()
    try:
        digest = await reg.push(path)
        url = f"{reg.repo_blob_url}/{digest}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{reg.url}/v2/") as r:
                assert r.status == 200
            async with s.get(url) as r:
                assert r.status == 200 and await r.read() == data
                assert r.headers["Docker-Content-Digest"] == digest
            async with s.get(url, headers={"Range": "bytes=1000-1999"}) as r:
                assert r.status == 206
                assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
                assert await r.read() == data[1000:2000]
            async with s.get(url, headers={"Range": f"bytes={len(data) - 10}-"}) as r:
                assert r.status == 206 and await r.read() == data[-10:]
            async with s.get(url, headers={"Range": f"bytes={len(data)}-"}) as r:
                assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
            async with s.head(url) as r:
                assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
                assert r.headers["Accept-Ranges"] == "bytes"
            async with s.get(f"{reg.repo_blob_url}/sha256:{'0' * 64}") as r:
                assert r.status == 404
            async with s.get(f"{reg.url}/v2/other/repo/blobs/{digest}") as r:
                assert r.status == 404
            async with s.delete(url) as r:
                assert r.status == 405
    finally:
        await reg.aclose()


async def test_product_client_reads_from_in_process_registry(blob):
    path, data = blob
    reg = await InProcessRegistry().start()
    client = RegistryClient(GlobalConfig())
    try:
        digest = await reg.push(path)
        url = f"{reg.repo_blob_url}/{digest}"
        assert await client.blob_size(url) == len(data)
        buf = bytearray(4096)
        await client.read_range_into(url, 123_456, memoryview(buf))
        assert bytes(buf) == data[123_456:127_552]
    finally:
        await client.aclose()
        await reg.aclose()


@pytest.mark.registry
@pytest.mark.skipif(find_docker_registry() is None, reason="docker-registry not installed")
async def test_docker_registry_push_and_range(blob, tmp_path):
    path, data = blob
    reg = await DockerRegistry(tmp_path / "reg").start()
    try:
        digest = await reg.push(path)
        assert await reg.push(path) == digest  # already there: no second upload
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{reg.repo_blob_url}/{digest}", headers={"Range": "bytes=100-199"}) as r:
                assert r.status == 206 and await r.read() == data[100:200]
        proc = reg._proc
    finally:
        await reg.aclose()
    assert proc.returncode is not None  # the registry process is gone
