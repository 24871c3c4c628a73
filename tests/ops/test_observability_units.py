"""ops/ pieces on their own: which log files a command writes, rotation, metric labels of the
frontend counters, the throughput meter, retry causes, control-socket and exporter errors."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_obd.config import ExporterConfig, GlobalConfig, load_global_config
from tcmu_obd.errors import ConfigError, ObdError
from tcmu_obd.ops import audit as audit_mod
from tcmu_obd.ops.counters import CommandCounters
from tcmu_obd.ops.logs import configure, plan
from tcmu_obd.ops.metrics import ObdCollector, RateMeter
from tcmu_obd.ops.observability import Observability
from tcmu_obd.remote.registry import retry_cause

MiB = 1 << 20


def _gc(tmp_path, doc: dict) -> GlobalConfig:
    path = tmp_path / "overlaybd.json"
    path.write_text(json.dumps(doc))
    return load_global_config(str(path))


def test_run_follows_upstream_defaults_and_one_shot_tools_only_explicit_keys(tmp_path):
    gc = _gc(tmp_path, {})
    p = plan(gc, upstream_defaults=True)
    assert (p.log_path, p.level, p.size_mb, p.rotate) == ("/var/log/overlaybd.log", logging.INFO, 10, 3)
    assert p.audit_path == "/var/log/overlaybd-audit.log"
    p = plan(gc, upstream_defaults=False)
    assert p.log_path == "" and p.audit_path == ""
    assert plan(GlobalConfig(), upstream_defaults=True).log_path == ""  # built-in defaults: stderr only

    gc = _gc(tmp_path, {"logConfig": {"logLevel": 2, "logPath": "/x/obd.log", "logSizeMB": 5, "logRotateNum": 7},
                        "enableAudit": False, "auditPath": "/x/audit.log"})
    for upstream in (True, False):
        p = plan(gc, upstream_defaults=upstream)
        assert (p.log_path, p.level, p.size_mb, p.rotate, p.audit_path) == ("/x/obd.log", logging.WARNING, 5, 7, "")
    # the legacy top-level keys when logConfig.logPath is empty: 10 MB x 3
    gc = _gc(tmp_path, {"logLevel": 0, "logPath": "/y/legacy.log", "logConfig": {"logSizeMB": 1},
                        "auditPath": "/y/a.log"})
    p = plan(gc, upstream_defaults=False)
    assert (p.log_path, p.level, p.size_mb, p.rotate, p.audit_path) == ("/y/legacy.log", logging.DEBUG, 10, 3,
                                                                        "/y/a.log")


@pytest.mark.parametrize("doc, key", [
    ({"logConfig": {"logPath": "/l", "logLevel": 9}}, "logConfig.logLevel"),
    ({"logLevel": -1}, "logLevel"),
    ({"logConfig": {"logPath": "/l", "logSizeMB": 0}}, "logConfig.logSizeMB"),
])
def test_bad_log_settings_name_the_key(tmp_path, doc, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan(_gc(tmp_path, doc), upstream_defaults=True)


def test_log_file_rotates_by_size_and_keeps_log_rotate_num_files(tmp_path):
    path = tmp_path / "logs" / "obd.log"  # the directory is created
    gc = _gc(tmp_path, {"logConfig": {"logLevel": 1, "logPath": str(path), "logSizeMB": 1, "logRotateNum": 2}})
    root = logging.getLogger()
    before = list(root.handlers)
    setup = configure(gc, upstream_defaults=False)
    try:
        log = logging.getLogger("tcmu_obd.test")
        line = "x" * 1000
        for _ in range(3600):  # ~3.5 MiB
            log.info(line)
        log.debug("below logLevel 1")
    finally:
        setup.close()
    assert root.handlers == before
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["obd.log", "obd.log.1", "obd.log.2"]
    assert all(p.stat().st_size <= MiB for p in path.parent.iterdir())
    assert "below logLevel 1" not in path.read_text()
    assert path.read_text().splitlines()[-1].endswith(f"INFO tcmu_obd.test: {line}")


def test_audit_is_silent_until_configured_and_quotes_values(tmp_path):
    assert audit_mod.logger().disabled
    gc = _gc(tmp_path, {"enableAudit": True, "auditPath": str(tmp_path / "a.log")})
    setup = configure(gc, upstream_defaults=False)
    try:
        audit_mod.audit("open", device="my disk", config="/c.json", size=512, ratio=0.5)
    finally:
        setup.close()
    audit_mod.audit("close", device="after close")  # not written: the audit log is closed
    (line,) = (tmp_path / "a.log").read_text().splitlines()
    assert line.split(" ", 2)[2] == 'open device="my disk" config=/c.json size=512 ratio=0.500'
    assert audit_mod.logger().disabled


def test_unwritable_log_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "file").write_text("")
    gc = _gc(tmp_path, {"logConfig": {"logPath": str(tmp_path / "file" / "obd.log")}})
    setup = configure(gc, upstream_defaults=False)
    assert setup.handlers == [] and "obd.log" in setup.errors[0]


def _scrape(collector) -> dict:
    reg = CollectorRegistry()
    reg.register(collector)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}


def test_frontend_counters_are_labelled_by_name():
    scsi, nbd = CommandCounters(), CommandCounters()
    for _ in range(3):
        scsi.record("lun0", 0x28, 0)
    scsi.record("lun0", 0x2A, 2)
    scsi.record("lun0", 0xFF, 2)
    nbd.record("", 0, 0)
    nbd.record("", 1, 5)
    m = _scrape(ObdCollector(schedulers=lambda: [], scsi=scsi, nbd=nbd))
    row = "tcmu_obd_scsi_commands_total"
    assert m[(row, (("device", "lun0"), ("opcode", "READ_10"), ("status", "GOOD")))] == 3
    assert m[(row, (("device", "lun0"), ("opcode", "WRITE_10"), ("status", "CHECK_CONDITION")))] == 1
    assert m[(row, (("device", "lun0"), ("opcode", "0xff"), ("status", "CHECK_CONDITION")))] == 1
    assert m[("tcmu_obd_nbd_commands_total", (("command", "READ"), ("export", ""), ("status", "OK")))] == 1
    assert m[("tcmu_obd_nbd_commands_total", (("command", "WRITE"), ("export", ""), ("status", "EIO")))] == 1


def test_rate_meter_spans_the_last_seconds_and_restarts_on_a_reset():
    m = RateMeter(span=2.0)
    assert m.rate == 0.0
    m.update(0.0, 0)
    m.update(1.0, 100)
    assert m.rate == 100.0
    for t in range(2, 10):
        m.update(float(t), 100 + (t - 1) * 10)  # slows down to 10/s
    assert m.rate == pytest.approx(10.0)
    m.update(10.0, 5)  # counter went down (a new blob under the same name)
    assert m.rate == 0.0


@pytest.mark.parametrize("reason, cause", [
    ("503 Service unavailable", "throttled"), ("429 Too many requests", "throttled"),
    ("server error 502", "server_error"), ("timed out", "timeout"), ("timed out: TimeoutError()", "timeout"),
    ("connection failed: ClientOSError()", "connection"),
    ("body of bytes=0-9 broke after 3 bytes: x", "broken_body"), ("short body: 1 of 2 bytes", "broken_body"),
])
def test_retry_causes(reason, cause):
    assert retry_cause(reason) == cause


async def test_control_socket_refuses_a_live_one_and_replaces_a_stale_one(tmp_path):
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed process's socket
    async with Observability(GlobalConfig(), command="a", control_socket=str(path)) as a:
        assert a.socket_path == str(path)
        with pytest.raises(ObdError, match="another process is serving it"):
            async with Observability(GlobalConfig(), command="b", control_socket=str(path)):
                pass
    assert not path.exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(ObdError, match="control socket .*/f/c.sock"):
        async with Observability(GlobalConfig(), command="c", control_socket=str(tmp_path / "f" / "c.sock")):
            pass
    async with Observability(GlobalConfig(), command="d", control_socket="none") as d:
        assert d.socket_path == ""


async def test_exporter_port_in_use_is_a_clear_error():
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    try:
        gc = GlobalConfig(exporter_config=ExporterConfig(enable=True, port=busy.getsockname()[1]))
        with pytest.raises(ObdError, match=f"exporterConfig: cannot listen on port {busy.getsockname()[1]}"):
            async with Observability(gc, command="x", control_socket="none"):
                pass
    finally:
        busy.close()


def test_sockets_of_dead_processes_are_pruned(tmp_path):
    import os
    import subprocess

    from tcmu_obd.ops.observability import prune_stale

    gone = subprocess.Popen(["true"])
    gone.wait()
    for name in (f"fetch-{gone.pid}.sock", f"serve-{os.getpid()}.sock", "img.sock"):
        (tmp_path / name).write_text("")
    assert prune_stale(str(tmp_path)) == [str(tmp_path / f"fetch-{gone.pid}.sock")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.sock", f"serve-{os.getpid()}.sock"]
