"""sd_notify over a real unix datagram socket, from the module and from a real `tcmu-obd serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tcmu_obd.ops import sdnotify
from tests.support.paths import FIXTURES_OBD

TCMU_OBD = os.path.join(os.path.dirname(sys.executable), "tcmu-obd")
P1_CONFIG = FIXTURES_OBD / "pattern" / "configs" / "p1.lz4.zfile.config.v1.json"


@pytest.fixture
def listener(tmp_path):
    """A bound datagram socket (what systemd listens on); recv times out instead of hanging."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    yield str(path), sock
    sock.close()


@pytest.fixture
def service_env(tmp_path, listener):
    """Environment and global config for a child command: its own cache and run dir, and
    NOTIFY_SOCKET pointing at `listener`."""
    path, _ = listener
    gcfg = tmp_path / "overlaybd.json"
    gcfg.write_text(json.dumps({"cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache")}}))
    env = dict(os.environ, NOTIFY_SOCKET=path, TCMU_OBD_RUN_DIR=str(tmp_path))
    return env, str(gcfg)


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_with_status_is_one_datagram(listener):
    path, sock = listener
    assert sdnotify.ready("serving 2 device(s)\nsecond line", env={"NOTIFY_SOCKET": path})
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving 2 device(s) second line"}
    assert sdnotify.stopping(env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STOPPING=1"
    assert sdnotify.status("draining", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STATUS=draining"


def test_abstract_namespace_socket():
    name = f"tcmu-obd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent():
    assert sdnotify.socket_address({}) is None
    assert sdnotify.ready(env={}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False
    # a vsock address (systemd >= 254, for VMs) is not ours to use
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_nobody_listening_is_not_fatal(tmp_path, caplog):
    gone = str(tmp_path / "nobody.sock")
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": gone}) is False
    assert "sd_notify" in caplog.text and "nobody.sock" in caplog.text


def test_malformed_assignment_is_refused(listener):
    path, _ = listener
    with pytest.raises(ValueError, match="VAR=value"):
        sdnotify.notify("READY", env={"NOTIFY_SOCKET": path})
    with pytest.raises(ValueError, match="VAR=value"):
        sdnotify.notify("STATUS=a\nREADY=1", env={"NOTIFY_SOCKET": path})


def test_serve_notifies_ready_then_stopping(tmp_path, listener, service_env):
    """A real `tcmu-obd serve` sends READY=1 once it listens, STOPPING=1 on SIGTERM."""
    _, sock = listener
    env, gcfg = service_env
    nbd = tmp_path / "nbd.sock"
    proc = subprocess.Popen([TCMU_OBD, "serve", "--global-config", gcfg,
                             str(P1_CONFIG), "--nbd", f"unix:{nbd}", "--read-only"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = _fields(sock.recv(4096))
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"serving nbd+unix:///?socket={nbd}"
        assert nbd.exists()  # READY means clients can connect now
        proc.send_signal(signal.SIGTERM)
        assert _fields(sock.recv(4096)) == {"STOPPING": "1"}
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "listening on" in proc.stdout.read()


def test_serve_startup_failure_reports_status(tmp_path, listener, service_env):
    _, sock = listener
    env, gcfg = service_env
    missing = tmp_path / "absent.config.v1.json"
    proc = subprocess.run([TCMU_OBD, "serve", "--global-config", gcfg, str(missing),
                           "--nbd", f"unix:{tmp_path / 'nbd.sock'}"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    status = _fields(sock.recv(4096))
    assert "READY" not in status
    assert status["STATUS"].startswith("startup failed:") and str(missing) in status["STATUS"]


def test_run_notifies_its_outcome(listener, service_env):
    """`tcmu-obd run`: READY=1 once serving where target_core_user is loaded; elsewhere (as on
    most build hosts) the startup failure is reported as STATUS and nothing claims readiness."""
    _, sock = listener
    env, gcfg = service_env
    proc = subprocess.Popen([TCMU_OBD, "run", "--global-config", gcfg],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = _fields(sock.recv(4096))
        if os.path.isdir("/sys/module/target_core_user"):
            assert first["READY"] == "1" and first["STATUS"].startswith("serving ")
            proc.send_signal(signal.SIGTERM)
            assert _fields(sock.recv(4096)) == {"STOPPING": "1"}
            assert proc.wait(timeout=60) == 0
        else:
            assert "READY" not in first
            assert first["STATUS"] == "error: target_core_user kernel module is not loaded (modprobe target_core_user)"
            assert proc.wait(timeout=60) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
