"""The demo's minimal NBD client against the product's NBDServer (a raw file export), and the
whole-export hash both through nbdcopy and through the built-in fallback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil

import pytest

from tcmu_obd.demo import run as demo_run
from tcmu_obd.demo.nbdclient import NBDClient, NBDClientError
from tcmu_obd.frontends.nbd.server import NBDServer
from tcmu_obd.tools.serve import RawFileImage


@pytest.fixture
async def export(tmp_path):
    data = os.urandom(3 << 20)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(data)
    image = RawFileImage(str(raw))
    server = NBDServer(image, read_only=True)
    sock = str(tmp_path / "nbd.sock")
    await server.serve_unix(sock)
    try:
        yield sock, data
    finally:
        await server.aclose(grace=0)
        await image.aclose()


async def test_client_reads_pipelined(export):
    sock, data = export
    c = await NBDClient.connect_unix(sock)
    try:
        assert c.size == len(data)
        reads = [(0, 4096), (12345, 100), (1 << 20, 1 << 20), (len(data) - 512, 512)]
        got = await asyncio.gather(*(c.read(o, n) for o, n in reads))
        assert got == [data[o: o + n] for o, n in reads]
        blob, ttfb = await c.read_timed(4096, 4096)
        assert blob == data[4096:8192] and ttfb >= 0
    finally:
        await c.aclose()
    await c.aclose()  # idempotent


async def test_client_read_error_is_reported(export):
    sock, data = export
    c = await NBDClient.connect_unix(sock)
    try:
        with pytest.raises(NBDClientError):
            await c.read(len(data) - 100, 4096)  # past the end: the server answers EINVAL
        assert await c.read(0, 16) == data[:16]  # the connection survives
    finally:
        await c.aclose()


async def test_client_refused_export(export):
    sock, _data = export
    with pytest.raises(NBDClientError):
        await NBDClient.connect_unix(sock, export_name="no-such-export")


@pytest.mark.parametrize("use_nbdcopy", [True, False])
async def test_hash_export(export, monkeypatch, use_nbdcopy):
    sock, data = export
    if use_nbdcopy and shutil.which("nbdcopy") is None:
        pytest.skip("nbdcopy (libnbd-bin) not installed")
    if not use_nbdcopy:
        monkeypatch.setattr(demo_run.shutil, "which", lambda name: None)
    sha, how = await demo_run._hash_export(sock, len(data))
    assert sha == hashlib.sha256(data).hexdigest()
    assert how == ("nbdcopy" if use_nbdcopy else "built-in NBD client")
