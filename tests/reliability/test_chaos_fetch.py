"""One scripted chaos run of the real `tcmu-obd fetch` (a subprocess) through the fault proxy in
front of the real docker-registry: 503 bursts, connection resets, a short body, long stalls, a
flipped byte and a kill -9 mid-fill, then a rerun. It must end with the right sha256 and the
server must have sent at most 1.35x the blob in total.

Synchronisation is on observable events only (the durable presence map, the proxy's counters)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.reliability.helpers import durable_bytes, sha256, zfile_blob
from tests.support.fetchcli import DONE, fetch_cmd, write_configs
from tests.support.faultproxy import Fault
from tests.support.paths import REPO_ROOT
from tests.support.registry import push_blob, registry, wait_until  # noqa: F401  (fixture)

pytestmark = pytest.mark.registry

MiB = 1 << 20
BUSY = {"Retry-After": "0"}


def test_chaos_fetch_ends_verified_within_135_percent(tmp_path, registry, fault_proxy):  # noqa: F811
    blob = zfile_blob(32, seed=7)  # ~24 MiB ZFile with per-block CRCs, as a real layer
    size = len(blob)
    digest = push_blob(registry.url, "chaos/fetch", blob)
    assert digest == sha256(blob)
    proxy = fault_proxy(registry.url)
    gconf, conf = write_configs(tmp_path, f"{proxy.url}/v2/chaos/fetch/blobs", [(digest, size)])
    stats = tmp_path / "stats.json"
    # sock_read 0.5 s: a stalled body costs half a second, not the default 30
    cmd = fetch_cmd(gconf, conf, "--read-timeout", "0.5", "--mode", "fixed", "--concurrency", "4",
                    "--chunk-size", "1M")
    map_path = tmp_path / "layer0" / ".download.map"
    commit = tmp_path / "layer0" / "overlaybd.commit"

    # -- run 1: a 503 burst, a reset, a stall, slow bodies; kill -9 a third of the way in
    first_faults = [
        proxy.add(Fault(status=503, headers=BUSY, times=3)),
        proxy.add(Fault(kind="reset", after_bytes=300_000, skip=2, times=1)),
        proxy.add(Fault(kind="stall", after_bytes=200_000, delay=2.0, skip=3, times=1)),
    ]
    slow = proxy.add(Fault(kind="slow", chunk=32 << 10, delay=0.01, times=-1))
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: durable_bytes(map_path, size) >= 6 * MiB, 60, "6 MiB durably fetched")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stdout.close()
    assert first.returncode == -signal.SIGKILL
    at_kill = durable_bytes(map_path, size)
    assert 6 * MiB <= at_kill < size - 6 * MiB
    assert not commit.exists()
    assert [f.hits for f in first_faults] == [3, 1, 1]

    # -- run 2 (the rerun): more 503s, a reset, a short body, a stall, and one flipped byte in a
    # range run 1 never got to
    proxy.clear()
    assert slow.hits > 0
    flip_at = size - 3 * MiB + 12345
    second_faults = [
        proxy.add(Fault(status=503, headers=BUSY, times=4)),
        proxy.add(Fault(kind="reset", after_bytes=100_000, skip=1, times=1)),
        proxy.add(Fault(kind="truncate", after_bytes=500_000, skip=2, times=1)),
        proxy.add(Fault(kind="stall", after_bytes=64 << 10, delay=2.0, skip=3, times=1)),
        proxy.add(Fault(kind="corrupt", at=flip_at, times=1)),
    ]
    out = subprocess.run(cmd + ["--stats-json", str(stats)], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [f.hits for f in second_faults] == [4, 1, 1, 1, 1]

    # the right bytes, and only them, under the layer's final name
    assert sha256(commit.read_bytes()) == digest
    assert sorted(os.listdir(tmp_path / "layer0")) == ["overlaybd.commit"]
    s = json.loads(stats.read_text())
    assert s["mismatches"] == 1  # the flipped byte was caught by the digest...
    assert 0 < s["repaired_bytes"] <= 64 << 10  # ...and only its CRC-failing block was refetched
    m = DONE.search(out.stdout)
    assert m, out.stdout
    # resumed: what run 1 made durable was not fetched again; the only extra bytes are the
    # repaired block and the fill endgame's hedges (at most half a 1 MiB request each)
    assert int(m.group(2)) <= size - at_kill + s["repaired_bytes"] + s["hedges"] * MiB // 2
    total = proxy.sent_bytes()
    assert total <= 1.35 * size, f"server sent {total} bytes for a {size}-byte blob ({total / size:.2f}x)"
