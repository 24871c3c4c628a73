"""Host-side unit tests of the LUN → block device lookup (tcmu_obd/frontends/tcmu/udev.py)
and of `tcmu-obd device`, on a fake sysfs/configfs tree. No VM needed; the real kernel path
is covered by test_vm.py (device_lookup, device_lookup_wait, device_lookup_udev)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from tcmu_obd.errors import ObdError
from tcmu_obd.frontends.tcmu import udev
from tcmu_obd.tools import device as device_tool

LOOP_DEV = "devices/tcm_loop_0/tcm_loop_adapter_0/host3/target3:0:1/3:0:1:0"
ISCSI_DEV = "devices/platform/host4/session1/target4:0:0/4:0:0:0"


def _vpd80(serial: str) -> bytes:
    return bytes([0, 0x80, 0, len(serial)]) + serial.encode()


def _disk(root, rel: str, name: str, serial: str | None, wwid: str | None):
    dev = root / "sys" / rel
    (dev / "block" / name).mkdir(parents=True)
    if serial is not None:
        (dev / "vpd_pg80").write_bytes(_vpd80(serial))
    if wwid is not None:
        (dev / "wwid").write_text(wwid + "\n")
    # /sys/block/<name> -> .../block/<name>; .../block/<name>/device -> the SCSI device
    (root / "sys" / "block").mkdir(parents=True, exist_ok=True)
    os.symlink(dev / "block" / name, root / "sys" / "block" / name)
    os.symlink(dev, dev / "block" / name / "device")
    scsi = root / "sys" / "bus" / "scsi" / "devices"
    scsi.mkdir(parents=True, exist_ok=True)
    os.symlink(dev, scsi / rel.rsplit("/", 1)[1])


@pytest.fixture
def fake(tmp_path, monkeypatch):
    _disk(tmp_path, LOOP_DEV, "sdb", "1990000000000007", "naa.60014051990000000000007000000000")
    _disk(tmp_path, ISCSI_DEV, "sdc", "1990000000000007", "naa.60014051990000000000007000000000")
    _disk(tmp_path, "devices/pci0000:00/host0/target0:0:0/0:0:0:0", "sda", "OTHER123", None)
    tpg = tmp_path / "cfg" / "loopback" / "naa.1990000000000007" / "tpgt_1"
    (tpg / "lun" / "lun_0").mkdir(parents=True)
    (tpg / "address").write_text("3:0:1\n")
    monkeypatch.setattr(udev, "SYS_BLOCK", tmp_path / "sys" / "block")
    monkeypatch.setattr(udev, "SYS_SCSI_DEVICES", tmp_path / "sys" / "bus" / "scsi" / "devices")
    monkeypatch.setattr(udev, "CONFIGFS_TARGET", tmp_path / "cfg")
    monkeypatch.setattr(udev, "UDEV_RUN", tmp_path / "no-udev")
    return tmp_path


def test_normalize_and_vpd():
    assert udev.normalize_wwn(" naa.1990000000000001 ") == "1990000000000001"
    assert udev.normalize_wwn("0xABC") == "abc"
    assert udev.parse_vpd_pg80(_vpd80("1990000000000001")) == "1990000000000001"
    assert udev.parse_vpd_pg80(b"\x00\x83\x00\x00") is None
    assert udev.parse_vpd_pg80(None) is None


@pytest.mark.parametrize("candidate, ok", [
    ("1990000000000001", True),
    ("naa.60014051990000000000001000000000", True),   # sysfs wwid (VPD 0x83 NAA)
    ("360014051990000000000001000000000", True),      # udev ID_SERIAL ("3" + NAA)
    ("0x60014051990000000000001000000000", True),     # udev ID_WWN_WITH_EXTENSION
    ("LIO-ORG_TCMU_device_1990000000000001", True),
    ("1990000000000002", False),
    ("naa.60014051990000000000002000000000", False),
    ("naa.6001405aaaa", False),
    (None, False),
])
def test_serial_matching(candidate, ok):
    assert udev._serial_matches(candidate, "1990000000000001") is ok


def test_find_devices_loopback_first_then_iscsi(fake):
    devs = udev.find_devices("naa.1990000000000007")
    assert [(d.name, d.transport) for d in devs] == [("sdb", "loopback"), ("sdc", "iscsi")]
    assert devs[0].matched_by == "configfs:loopback-address"
    assert devs[1].matched_by == "sysfs:vpd_pg80"
    assert devs[0].serial == "1990000000000007"
    assert devs[0].node == "/dev/sdb" and devs[0].links == []


def test_find_devices_no_match(fake):
    assert udev.find_devices("naa.1990000000000008") == []
    with pytest.raises(ValueError):
        udev.find_devices("  ")


def test_device_cli(fake, capsys):
    ns = argparse.Namespace(wwn="1990000000000007", wait=False, timeout=1.0, json=False)
    assert device_tool.handler(ns) == 0
    assert capsys.readouterr().out.split() == ["/dev/sdb", "/dev/sdc"]
    ns.json = True
    assert device_tool.handler(ns) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["transport"] == "loopback" and out[1]["transport"] == "iscsi"
    ns.wwn = "naa.1990000000000009"
    with pytest.raises(ObdError, match="no block device"):
        device_tool.handler(ns)


def test_device_cli_registers():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    device_tool.register(sub)
    args = parser.parse_args(["device", "naa.1", "--wait", "--timeout", "2.5"])
    assert args.func is device_tool.handler and args.wait and args.timeout == 2.5


class _FakeEvent(dict):
    def __init__(self, action, devtype):
        super().__init__(DEVTYPE=devtype)
        self.action = action


class _FakeMonitor:
    """poll() yields: a dropped message (None), an unrelated event, then the disk's add event
    (after which the fake sysfs shows the disk)."""

    def __init__(self, on_add):
        self.script = [None, _FakeEvent("add", "partition"), _FakeEvent("add", "disk")]
        self.on_add = on_add
        self.started = False

    def filter_by(self, subsystem):
        assert subsystem == "block"

    def start(self):
        self.started = True

    def poll(self, timeout=None):
        assert self.started, "monitor must listen before the first state check"
        if not self.script:
            return None
        ev = self.script.pop(0)
        if ev is not None and ev.get("DEVTYPE") == "disk":
            self.on_add()
        return ev


def test_wait_for_device_survives_dropped_messages(fake, monkeypatch, tmp_path):
    pyudev = pytest.importorskip("pyudev")
    # the disk is not there yet: no tcm_loop target, no sysfs disk for WWN ...08
    def appear():
        _disk(tmp_path, "devices/tcm_loop_0/tcm_loop_adapter_1/host5/target5:0:1/5:0:1:0",
              "sdd", "1990000000000008", None)

    mon = _FakeMonitor(appear)
    monkeypatch.setattr(pyudev.Monitor, "from_netlink", classmethod(lambda cls, ctx, source="udev": mon))
    monkeypatch.setattr(udev, "_ready", lambda devs, ctx=None: devs)  # no /dev/sdd on the host
    devs = udev.wait_for_device("naa.1990000000000008", timeout=5)
    assert [d.name for d in devs] == ["sdd"] and devs[0].matched_by == "sysfs:vpd_pg80"
    assert mon.script == []


def test_wait_for_device_times_out(fake, monkeypatch):
    pyudev = pytest.importorskip("pyudev")
    mon = _FakeMonitor(lambda: None)
    mon.script = []
    monkeypatch.setattr(pyudev.Monitor, "from_netlink", classmethod(lambda cls, ctx, source="udev": mon))
    real_poll = mon.poll
    real_monotonic = udev.time.monotonic

    def poll(timeout=None):  # emulate the blocking timeout without sleeping: jump the clock
        monkeypatch.setattr(udev.time, "monotonic", lambda: real_monotonic() + 10)
        return real_poll(timeout)

    mon.poll = poll
    assert udev.wait_for_device("naa.1990000000000009", timeout=1) == []
