"""Find the block device (`/dev/sdX`, its `/dev/disk/by-id` links) of a TCMU LUN by WWN.

A LUN made by configfs-scripts/obd-lun-create has:

* a tcm_loop target `naa.<WWN>` whose `tpgt_1/address` ("H:C:T") names the SCSI device
  `/sys/bus/scsi/devices/H:C:T:0`, and
* a VPD page 0x80 unit serial equal to the WWN digits (the script writes them to the
  storage object's `wwn/vpd_unit_serial`; the handler's INQUIRY returns it), which the
  kernel exposes as `/sys/block/sdX/device/vpd_pg80` and udev as `ID_SCSI_SERIAL`.
  The NAA designator of VPD page 0x83 (sysfs `device/wwid`, udev `ID_WWN`/`ID_SERIAL`)
  embeds the same digits after the LIO OUI (`6001405`).

The serial also matches the LUN when it is reached some other way (iSCSI), so a lookup can
return several disks; `BlockDevice.transport` tells them apart.

Sources, in order: the udev database (pyudev) when udevd runs — it has the `ID_*`
properties and the `/dev/disk/by-id` links; otherwise a plain sysfs scan of every SCSI disk
(`device/vpd_pg80`, `device/wwid`), plus the configfs tcm_loop address. The rig VM has no
udevd, so the sysfs path is the one it tests.

`wait_for_device` is event-driven: a pyudev `Monitor` is started first (source "udev" when
udevd runs, so that by-id links exist when it returns; the kernel's own uevents otherwise),
then the current state is checked, then the monitor is polled until the deadline. No
sleep-polling.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIGFS_TARGET = Path("/sys/kernel/config/target")
SYS_BLOCK = Path("/sys/block")
SYS_SCSI_DEVICES = Path("/sys/bus/scsi/devices")
UDEV_RUN = Path("/run/udev")
LIO_NAA_PREFIX = "6001405"  # NAA type 6 + the LIO OUI 00:14:05


@dataclass
class BlockDevice:
    node: str  # /dev/sdX
    name: str  # sdX
    sys_path: str
    serial: str | None = None  # VPD 0x80 unit serial
    wwid: str | None = None  # sysfs device/wwid (VPD 0x83 designator), e.g. naa.6001405...
    transport: str = "scsi"  # "loopback" (tcm_loop), "iscsi" or "scsi"
    links: list[str] = field(default_factory=list)  # /dev/disk/by-id/* (udev only)
    matched_by: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_wwn(wwn: str) -> str:
    """'naa.1990000000000001' / '0x199...' / ' 199... ' -> '1990000000000001' (lower case)."""
    w = wwn.strip().lower()
    for prefix in ("naa.", "0x", "t10.", "eui."):
        if w.startswith(prefix):
            w = w[len(prefix):]
    return w


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def parse_vpd_pg80(raw: bytes | None) -> str | None:
    """Unit serial from a raw VPD page 0x80 (4-byte header, then ASCII)."""
    if not raw or len(raw) < 4 or raw[1] != 0x80:
        return None
    length = int.from_bytes(raw[2:4], "big")
    return raw[4:4 + length].decode("ascii", "replace").strip("\x00 ") or None


def _serial_matches(candidate: str | None, target: str) -> bool:
    if not candidate:
        return False
    c = normalize_wwn(candidate)
    if c == target:
        return True
    # NAA designators: LIO puts the serial's hex digits right after 6001405
    digits = re.sub(r"[^0-9a-f]", "", target)
    if len(digits) >= 8:
        naa = c.lstrip("3")  # udev ID_SERIAL of a SCSI disk is "3" + the NAA identifier
        if naa.startswith(LIO_NAA_PREFIX) and naa[len(LIO_NAA_PREFIX):].startswith(digits[:25]):
            return True
        if c.endswith("_" + target):  # ID_SERIAL "LIO-ORG_TCMU_device_<serial>" style
            return True
    return False


def _transport(sys_path: str) -> str:
    real = os.path.realpath(sys_path)
    if re.search(r"/session\d+/", real):
        return "iscsi"
    if "tcm_loop" in real:
        return "loopback"
    return "scsi"


def _describe(name: str) -> BlockDevice:
    sys_path = str(SYS_BLOCK / name)
    dev_dir = Path(sys_path) / "device"
    wwid = _read(dev_dir / "wwid")
    return BlockDevice(
        node=f"/dev/{name}", name=name, sys_path=os.path.realpath(sys_path),
        serial=parse_vpd_pg80(_read(dev_dir / "vpd_pg80")),
        wwid=wwid.decode("ascii", "replace").strip() if wwid else None,
        transport=_transport(sys_path),
    )


def _loopback_disks(target: str) -> list[str]:
    """Disk names of tcm_loop target naa.<target> LUNs, via tpgt_1/address."""
    out = []
    for tpg in sorted((CONFIGFS_TARGET / "loopback" / f"naa.{target}").glob("tpgt_*")):
        addr = _read(tpg / "address")
        if not addr:
            continue
        h_c_t = addr.decode().strip()
        for lun in sorted((tpg / "lun").glob("lun_*")):
            n = lun.name.split("_", 1)[1]
            for blk in (SYS_SCSI_DEVICES / f"{h_c_t}:{n}" / "block").glob("*"):
                out.append(blk.name)
    return out


def udev_running() -> bool:
    return (UDEV_RUN / "control").exists() or (UDEV_RUN / "data").is_dir()


def _udev_context():
    try:
        import pyudev
    except ImportError:  # pragma: no cover - pyudev is a dependency; sysfs still works
        return None
    try:
        return pyudev.Context()
    except Exception:  # noqa: BLE001 - libudev missing: fall back to sysfs
        return None


def _match_udev_device(dev, target: str) -> str | None:
    """Which property/attribute of a pyudev Device matched, or None."""
    props = dev.properties
    for key in ("ID_SCSI_SERIAL", "ID_SERIAL_SHORT", "ID_SERIAL", "ID_WWN_WITH_EXTENSION", "ID_WWN"):
        if _serial_matches(props.get(key), target):
            return f"udev:{key}"
    return None


def _match_sysfs(bd: BlockDevice, target: str) -> str | None:
    if _serial_matches(bd.serial, target):
        return "sysfs:vpd_pg80"
    if _serial_matches(bd.wwid, target):
        return "sysfs:wwid"
    return None


def find_devices(wwn: str, *, context=None) -> list[BlockDevice]:
    """Every disk whose serial/WWN matches `wwn`, plus the tcm_loop target of that name."""
    target = normalize_wwn(wwn)
    if not target:
        raise ValueError("empty WWN")
    found: dict[str, BlockDevice] = {}

    for name in _loopback_disks(target):
        bd = _describe(name)
        bd.matched_by = "configfs:loopback-address"
        bd.transport = "loopback"
        found[name] = bd

    names = sorted(p.name for p in SYS_BLOCK.glob("sd*")) if SYS_BLOCK.is_dir() else []
    for name in names:
        if name in found:
            continue
        bd = _describe(name)
        how = _match_sysfs(bd, target)
        if how:
            bd.matched_by = how
            found[name] = bd

    if udev_running():
        ctx = context or _udev_context()
        if ctx is not None:
            for dev in ctx.list_devices(subsystem="block", DEVTYPE="disk"):
                name = dev.sys_name
                how = _match_udev_device(dev, target)
                if name not in found and how:
                    bd = _describe(name)
                    bd.matched_by = how
                    found[name] = bd
                if name in found:
                    found[name].links = sorted(
                        link for link in dev.device_links if link.startswith("/dev/disk/by-id/"))
    return sorted(found.values(), key=lambda b: (b.transport != "loopback", b.name))


def _ready(devs: list[BlockDevice], ctx=None) -> list[BlockDevice]:
    """Disks whose device node exists (devtmpfs makes it before the uevent goes out) and,
    when udevd runs (`ctx` given), that udev has processed, so their by-id links exist."""
    out = [d for d in devs if os.path.exists(d.node)]
    if ctx is not None:
        import pyudev

        def initialized(d: BlockDevice) -> bool:
            try:
                return pyudev.Devices.from_sys_path(ctx, d.sys_path).is_initialized
            except Exception:  # noqa: BLE001 - gone again
                return False

        out = [d for d in out if initialized(d)]
    return out


def wait_for_device(wwn: str, timeout: float) -> list[BlockDevice]:
    """Like find_devices, but wait up to `timeout` seconds for a matching disk to appear.

    Returns [] on timeout. Race-free: the monitor is listening before the first check.
    """
    ctx = _udev_context()
    if ctx is None:
        raise RuntimeError("pyudev/libudev unavailable: cannot wait for uevents")
    import pyudev

    use_udev = udev_running()
    monitor = pyudev.Monitor.from_netlink(ctx, source="udev" if use_udev else "kernel")
    monitor.filter_by(subsystem="block")
    monitor.start()
    deadline = time.monotonic() + timeout
    udev_ctx = ctx if use_udev else None
    devs = _ready(find_devices(wwn, context=ctx), udev_ctx)
    while not devs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return []
        event = monitor.poll(timeout=remaining)
        if event is None:
            # a timeout, or a message libudev dropped (its subsystem filter runs in userspace
            # for kernel-source monitors): the deadline check above decides
            continue
        if event.action in ("add", "change", "bind") and event.get("DEVTYPE") == "disk":
            devs = _ready(find_devices(wwn, context=ctx), udev_ctx)
    return devs
