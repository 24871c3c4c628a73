"""`tcmu-obd status` against running `fetch` and `serve` processes (real subprocesses, real
docker-registry, real NBD client), and what those processes write: log file, audit log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_obd.ops.statusview import fetch_status
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.paths import FIXTURES_OBD, REPO_ROOT
from tests.support.registry import push_blob, registry, wait_until  # noqa: F401  (fixture)

L1 = FIXTURES_OBD / "ext4-chain" / "layers" / "L1.lz4.zfile"
KiB = 1024


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcmu_obd.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def _running_cli(*args: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """`tcmu-obd ARGS` started in the background (text pipes); killed on the way out if the
    test left it running."""
    proc = subprocess.Popen([sys.executable, "-m", "tcmu_obd.cli", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _status(sock) -> dict | None:
    try:
        return asyncio.run(fetch_status(str(sock)))
    except Exception:
        return None


def _value(st: dict, name: str, **labels) -> float:
    return sum(s["value"] for s in st["samples"]
               if s["name"] == name and all(s["labels"].get(k) == v for k, v in labels.items()))


def test_status_of_a_fetch_whose_registry_is_unreachable(tmp_path):
    """fetch starts its control socket once the first response arrives (it loads ~50 ms of
    modules, which must not delay the first requests) — or after a second without one: a
    fetch retrying against a registry that is down must still answer `tcmu-obd status`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections to it are refused
    sock = tmp_path / "run" / "fetch.sock"
    gconf = tmp_path / "overlaybd.json"
    gconf.write_text(json.dumps({"cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"),
                                                 "cacheSizeGB": 1},
                                 "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")}}))
    conf = tmp_path / "config.v1.json"
    conf.write_text(json.dumps({"repoBlobUrl": f"http://127.0.0.1:{port}/v2/ops/down/blobs/",
                                "lowers": [{"digest": "sha256:" + "ab" * 32, "size": 1 << 20}]}))
    with _running_cli("fetch", "--global-config", str(gconf), "--progress", "none", "--control-socket", str(sock),
                      str(conf)) as proc:
        st = wait_until(lambda: _status(sock), 30, "the control socket of a fetch with no registry")
        assert st["command"] == "fetch" and st["pid"] == proc.pid
        assert proc.poll() is None  # still trying
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not sock.exists()


@pytest.mark.registry
def test_status_of_a_running_fetch(tmp_path, registry):  # noqa: F811
    size = L1.stat().st_size
    digest = push_blob(registry.url, "ops/status", L1)
    sock = tmp_path / "run" / "fetch.sock"
    with FaultProxy(registry.url) as proxy:
        proxy.add(Fault(kind="slow", chunk=32 * KiB, delay=0.25, times=-1))  # ~9 s for the blob, until cleared
        gconf = tmp_path / "overlaybd.json"
        gconf.write_text(json.dumps({
            "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
            "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
            "exporterConfig": {"enable": True, "port": 0},
            "logConfig": {"logLevel": 1, "logPath": str(tmp_path / "log" / "obd.log")},
            "enableAudit": True, "auditPath": str(tmp_path / "log" / "audit.log"),
        }))
        conf = tmp_path / "config.v1.json"
        conf.write_text(json.dumps({"repoBlobUrl": f"{proxy.url}/v2/ops/status/blobs/",
                                    "lowers": [{"digest": digest, "size": size, "dir": str(tmp_path / "layer")}]}))
        (tmp_path / "layer").mkdir()
        with _running_cli("fetch", "--global-config", str(gconf), "--progress", "none", "--mode", "fixed",
                          "--concurrency", "2", "--chunk-size", "128K", "--control-socket", str(sock),
                          str(conf)) as proc:
            st = wait_until(lambda: (s := _status(sock)) and _value(s, "tcmu_obd_fetched_bytes_total",
                                                                     priority="fill") > 0 and s,
                            30, "fetch to report fill bytes")
            assert st["command"] == "fetch" and st["pid"] == proc.pid and st["config"] == str(conf)
            assert st["log_file"] == str(tmp_path / "log" / "obd.log")
            # the exporter of the same process (exporterConfig, port 0: the kernel picked one)
            port = int(st["metrics_url"].rsplit(":", 1)[1].split("/")[0])
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            sizes = [smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
                     if smp.name == "tcmu_obd_layer_size_bytes" and smp.labels == {"digest": digest}]
            assert sizes == [size]

            out = _cli("status", "--socket", str(sock))
            assert out.returncode == 0, out.stderr
            assert f"tcmu-obd fetch (pid {proc.pid})" in out.stdout
            layer = next(ln for ln in out.stdout.splitlines() if digest[:19] in ln)
            assert " active " in layer and "in flight" in layer
            js = _cli("status", "--socket", str(sock), "--json")
            (answer,) = json.loads(js.stdout)
            fill = _value(answer, "tcmu_obd_fetched_bytes_total", priority="fill")
            assert 0 < fill < size, "status must show the fill in progress"
            assert _value(answer, "tcmu_obd_fetched_bytes_total", priority="fill") >= \
                _value(st, "tcmu_obd_fetched_bytes_total", priority="fill")
            proxy.clear()  # the rest at full speed
            out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "fetch: done blobs=1" in out
    assert not sock.exists()  # removed on exit
    log = (tmp_path / "log" / "obd.log").read_text()
    assert "background fill started" in log  # INFO goes to the file (logLevel 1) ...
    assert "background fill started" not in err  # ... while stderr keeps its -v level
    events = [ln.split(" ")[2] for ln in (tmp_path / "log" / "audit.log").read_text().splitlines()]
    assert events == ["fill_start", "fill_done"]
    # nobody answers any more
    gone = _cli("status", "--socket", str(sock))
    assert gone.returncode == 1 and "no tcmu-obd process answers" in gone.stderr


def test_status_of_a_running_serve_counts_nbd_commands_and_audits_open_close(tmp_path):
    assert shutil.which("nbdcopy"), "install libnbd-bin"
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\xab" * (1 << 20))
    audit = tmp_path / "audit.log"
    gconf = tmp_path / "overlaybd.json"
    gconf.write_text(json.dumps({"logConfig": {"logLevel": 0, "logPath": str(tmp_path / "serve.log")},
                                 "enableAudit": True, "auditPath": str(audit)}))
    run_dir = tmp_path / "run"
    env = dict(os.environ, TCMU_OBD_CONTROL_DIR=str(run_dir))  # the default socket path, under tmp
    with _running_cli("serve", "--global-config", str(gconf), "--raw", str(raw), "--nbd", f"unix:{tmp_path}/nbd.sock",
                      "--read-only", env=env) as proc:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read() if proc.poll() is not None else line
        uri = line.split("listening on ", 1)[1].split()[0]
        sock = run_dir / f"serve-{proc.pid}.sock"
        assert sock.exists()
        subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.raw")], check=True, timeout=60)
        # no --socket: status asks every socket in the run directory
        out = subprocess.run([sys.executable, "-m", "tcmu_obd.cli", "status"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert f"tcmu-obd serve (pid {proc.pid})" in out.stdout and "NBD commands" in out.stdout
        (answer,) = json.loads(subprocess.run([sys.executable, "-m", "tcmu_obd.cli", "status", "--json"],
                                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                                              env=env).stdout)
        reads = _value(answer, "tcmu_obd_nbd_commands_total", command="READ", status="OK")
        assert reads >= 1 and "READ/OK" in out.stdout
        assert _value(answer, "tcmu_obd_image_size_bytes", image=str(raw)) == 1 << 20
        wrong = _cli("status", "--socket", f"{tmp_path}/nbd.sock")  # the NBD socket, not the control one
        assert wrong.returncode == 1 and "not a tcmu-obd control socket" in wrong.stderr
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert (tmp_path / "copy.raw").read_bytes() == raw.read_bytes()
    lines = audit.read_text().splitlines()
    assert [ln.split(" ")[2] for ln in lines] == ["open", "close"]
    assert f"device={uri} config={raw} size={1 << 20} read_only=True" in lines[0]
    assert "DEBUG" in (tmp_path / "serve.log").read_text() or "INFO" in (tmp_path / "serve.log").read_text()
