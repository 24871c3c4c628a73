"""The load scenario of bench/load_bench.py, short: one server process with 8 devices at once
(one scheduler, 8 NBD exports over the real docker-registry), random 4 KiB reads on every
device while the background fill runs. Every read must succeed with the right bytes.
Figures (latency, RSS) belong to the benchmark, not here."""

from __future__ import annotations

import asyncio

import pytest

from bench.load_bench import run_load
from tests.support.registry import push_blob

pytestmark = pytest.mark.registry

DEVICES = 8


class _Repo:
    """The session registry with the push interface run_load expects."""

    def __init__(self, reg, repo: str):
        self.reg, self.repo = reg, repo
        self.repo_blob_url = reg.repo_blob_url(repo)

    async def push(self, path) -> str:
        return await asyncio.to_thread(push_blob, self.reg.url, self.repo, path)


async def test_eight_devices_at_once_read_right_bytes_while_filling(tmp_path, registry):
    r = await run_load(tmp_path, _Repo(registry, "test/load"), devices=DEVICES, image_mib=2, duration=4.0,
                       readers=2, rate=0, fill_mibps=1.0, log=lambda *a: None)
    assert r["errors"] == 0, r["error_samples"]
    assert r["server_exit"] == 0
    assert all(n > 0 for n in r["verified_reads_per_device"]), r["verified_reads_per_device"]
    assert r["bytes_verified"] == 4096 * r["reads"]
    server = r["server"]
    assert server["nbd_errors"] == 0 and server["blobs"] == DEVICES
    assert server["fill_bytes"] > 0  # the fill really ran alongside the reads
