"""`tcmu-obd fetch` against the real docker-registry: complete + verified, upstream mode,
and kill -9 mid-fill then resume without starting over."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from tcmu_obd.cache import PresenceMap
from tcmu_obd.cli import main
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.fetchcli import DONE, fetch_cmd, write_configs
from tests.support.paths import FIXTURES_OBD, REPO_ROOT
from tests.support.registry import push_blob, registry, wait_until  # noqa: F401  (fixture)
from tests.support.scheduling import assert_fetched_once

pytestmark = pytest.mark.registry

LAYERS = FIXTURES_OBD / "ext4-chain" / "layers"
def _write_configs(tmp_path: Path, repo_blob_url: str, blobs: list[tuple[str, int]]):
    return write_configs(tmp_path, repo_blob_url, blobs,
                         download={"enable": False, "delay": 600, "maxMBps": 1})  # fetch ignores all three


def test_fetch_fills_every_remote_lower(tmp_path, registry, capsys):  # noqa: F811
    names = ["L1.lz4.zfile", "L2.lz4.zfile"]
    blobs = [(push_blob(registry.url, "fetch/ok", LAYERS / n), (LAYERS / n).stat().st_size) for n in names]
    gconf, conf = _write_configs(tmp_path, registry.repo_blob_url("fetch/ok"), blobs)
    stats = tmp_path / "stats.json"
    rc = main(["fetch", "--global-config", str(gconf), "--progress", "plain", "--stats-json", str(stats), str(conf)])
    assert rc == 0
    for i, n in enumerate(names):
        assert (tmp_path / f"layer{i}" / "overlaybd.commit").read_bytes() == (LAYERS / n).read_bytes()
        assert sorted(os.listdir(tmp_path / f"layer{i}")) == ["overlaybd.commit"]
    m = DONE.search(capsys.readouterr().out)
    s = json.loads(stats.read_text())
    assert s["ok"] is True
    assert m and int(m.group(1)) == 2
    assert_fetched_once(int(m.group(2)), sum(n for _, n in blobs), s["hedged_bytes"])
    # the first requests rode connections opened while the program was still loading
    assert s["preconnect"]["taken"] >= 1 and s["preconnect"]["discarded"] == 0, s["preconnect"]
    # run again: everything is local now, nothing to do
    assert main(["fetch", "--global-config", str(gconf), "--progress", "none", str(conf)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_fetch_upstream_mode_is_sequential_256k(tmp_path, registry):  # noqa: F811
    p = LAYERS / "L1.lz4.zfile"
    size = p.stat().st_size
    blobs = [(push_blob(registry.url, "fetch/upstream", p), size)]
    gconf, conf = _write_configs(tmp_path, registry.repo_blob_url("fetch/upstream"), blobs)
    stats = tmp_path / "stats.json"
    rc = main(["fetch", "--global-config", str(gconf), "--mode", "upstream", "--progress", "none",
               "--stats-json", str(stats), str(conf)])
    assert rc == 0
    s = json.loads(stats.read_text())
    assert s["requests"]["FILL"] == -(-size // (256 * 1024))
    assert (tmp_path / "layer0" / "overlaybd.commit").read_bytes() == p.read_bytes()


def test_fetch_fails_cleanly_on_a_missing_blob(tmp_path, registry, capsys):  # noqa: F811
    gconf, conf = _write_configs(tmp_path, registry.repo_blob_url("fetch/missing"), [("sha256:" + "ab" * 32, 4096)])
    rc = main(["fetch", "--global-config", str(gconf), "--progress", "none", str(conf)])
    assert rc != 0
    assert not (tmp_path / "layer0" / "overlaybd.commit").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "sigint"])
def test_interrupted_mid_fill_then_resume(tmp_path, registry, sig):  # noqa: F811
    size = 16 << 20
    data = random.Random(42).randbytes(size)
    digest = push_blob(registry.url, "fetch/kill", data)
    with FaultProxy(registry.url) as proxy:
        # slow every blob body down so the first run is surely mid-way when killed
        slow = proxy.add(Fault(kind="slow", chunk=16 << 10, delay=0.02, times=-1, match="/blobs/"))
        gconf, conf = _write_configs(tmp_path, f"{proxy.url}/v2/fetch/kill/blobs", [(digest, size)])
        cmd = fetch_cmd(gconf, conf)
        first = subprocess.Popen(cmd + ["--mode", "fixed", "--concurrency", "2", "--chunk-size", "256K"],
                                 cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        map_path = tmp_path / "layer0" / ".download.map"

        def durable_bytes():
            m = PresenceMap.load(str(map_path), size)
            return m.present_bytes if m is not None else 0

        try:
            wait_until(lambda: durable_bytes() >= 2 << 20, 60, "2 MiB durably fetched")
            os.kill(first.pid, sig)
            first.wait(60)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            first.stdout.close()
        assert first.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
        at_kill = durable_bytes()
        assert 2 << 20 <= at_kill < size
        assert not (tmp_path / "layer0" / "overlaybd.commit").exists()

        proxy.clear()  # full speed for the second run
        assert slow.hits > 0
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    m = DONE.search(out.stdout)
    assert m, out.stdout
    fetched = int(m.group(2))
    assert fetched <= size - at_kill, out.stderr[-3000:]  # resumed: what was durable was not fetched again
    assert fetched < size
    assert (tmp_path / "layer0" / "overlaybd.commit").read_bytes() == data


def test_fetch_options_start_wide_and_staggered():
    """fetch has the link to itself: a wide first burst (128 requests of 512 KiB on
    connections opened early) whose request sizes are staggered, requests of ~1/10 of the BDP,
    and a window only a queue in front of the bottleneck shrinks; a daemon's scheduler keeps
    the defaults."""
    from tcmu_obd.cli import build_parser
    from tcmu_obd.scheduler import SchedulerOptions
    from tcmu_obd.tools.fetch import _options

    o = _options(build_parser(["fetch", "c.json"]).parse_args(["fetch", "c.json"]))
    assert (o.mode, o.initial_requests, o.stagger_first_burst) == ("adaptive", 128, True)
    assert (o.initial_chunk, o.max_concurrency) == (512 * 1024, 128)
    assert (o.queue_signal, o.chunk_bdp_fraction) == ("first_byte", 0.1)
    assert o.first_burst == 128  # connections opened early
    w = o.make_window(256 * 1024)
    assert (w.window_bytes, w.chunk, w.max_requests) == (64 << 20, 512 * 1024, 128)
    narrow = _options(build_parser(["fetch", "c.json"]).parse_args(["fetch", "--concurrency", "32", "c.json"]))
    assert (narrow.max_concurrency, narrow.first_burst) == (32, 32)
    assert SchedulerOptions(mode="fixed", fixed_concurrency=16).first_burst == 16
    assert SchedulerOptions(mode="upstream").first_burst == 1
    d = SchedulerOptions()
    assert (d.initial_requests, d.stagger_first_burst, d.queue_signal, d.chunk_bdp_fraction) == (8, False, "request", 1.0)
    assert (d.initial_chunk, d.max_concurrency) == (1 << 20, 64)
    assert (w.queue_signal, w.chunk_bdp_fraction) == ("first_byte", 0.1)


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "soon"])
def test_fetch_refuses_a_bad_read_timeout_before_doing_anything(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fetch", "--read-timeout", bad, str(tmp_path / "missing.json")])
    assert e.value.code == 2
    assert "--read-timeout" in capsys.readouterr().err


def test_start_up_runs_without_the_cyclic_collector_and_restores_it():
    import gc as collector

    from tcmu_obd.tools.fetch import _StartUpWithoutGC

    assert collector.isenabled()
    with _StartUpWithoutGC() as start_up:
        assert not collector.isenabled()
        start_up.resume()  # the first response is in: what exists now is never walked again
        assert collector.isenabled() and collector.get_freeze_count() > 0
    assert collector.isenabled() and collector.get_freeze_count() == 0

    collector.disable()  # whoever disabled it keeps it that way
    try:
        with _StartUpWithoutGC() as start_up:
            start_up.resume()
            assert not collector.isenabled()
        assert not collector.isenabled() and collector.get_freeze_count() == 0
    finally:
        collector.enable()
