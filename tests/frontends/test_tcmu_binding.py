"""The cffi binding over the real libtcmu.so.2.

No TCMU kernel here, so `FakeKernel` plays the kernel's half of the uapi
(target_core_user.h): it lays out a mailbox + command ring + data area in anonymous
memory, queues command entries, and reads responses back. A `struct tcmu_device` is
built by hand around it (libtcmu_priv.h offsets, verified by disassembly — docs/tcmu.md).
Then the *real* tcmulib_get_next_command / tcmulib_command_complete /
tcmulib_processing_start/complete run against it, driven by tcmu-obd's own device loop.
The netlink half (tcmulib_initialize, added/removed) needs the kernel: VM rig.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import socket
import struct

import pytest

from tcmu_obd.frontends.tcmu import binding, scsi
from tcmu_obd.frontends.tcmu.binding import ffi, lib
from tcmu_obd.frontends.tcmu.commands import CommandProcessor, IoPolicy
from tcmu_obd.frontends.tcmu.daemon import Daemon, DaemonConfig
from tcmu_obd.frontends.tcmu.device import DeviceState, TcmuDevice
from tcmu_obd.frontends.tcmu.scsi import DeviceInfo, ScsiStatus
from tcmu_obd.image.memory import MemoryImage
from tests.support.cdb import rw10, rw16

BS = 512

# --- layouts ---------------------------------------------------------------------------------


def test_module_builds_and_imports():
    assert lib is not None and ffi is not None
    binding.require_binding()
    for name in (
        "tcmulib_initialize",
        "tcmulib_get_master_fd",
        "tcmulib_master_fd_ready",
        "tcmulib_close",
        "tcmulib_get_next_command",
        "tcmulib_command_complete",
        "tcmulib_processing_start",
        "tcmulib_processing_complete",
        "tcmu_dev_get_cfgstring",
        "obd_copy_to_iovec",
        "obd_copy_from_iovec",
        "obd_start_and_peek",
        "obd_peek_commands",
        "obd_complete_in_place",
        "tcmu_dev_get_memory_info",
    ):
        assert callable(getattr(lib, name))


def test_module_links_the_system_libtcmu():
    with open(f"/proc/{os.getpid()}/maps") as f:
        maps = f.read()
    assert "libtcmu.so.2" in maps


@pytest.mark.parametrize(
    "field,offset",
    [
        ("name", 0x00),
        ("subtype", 0x08),
        ("cfg_desc", 0x10),
        ("ctx", 0x18),
        ("check_config", 0x20),
        ("reconfig", 0x28),
        ("update_logdir", 0x30),
        ("added", 0x38),
        ("removed", 0x40),
        ("hm_private", 0x48),
        ("connection", 0x50),
    ],
)
def test_handler_layout(field, offset):
    # 1.5.4: tcmulib_initialize copies handlers with stride 0x58 and sets ctx at +0x18;
    # device add calls *(handler+0x38) (added) and *(handler+0x20) (check_config);
    # remove calls *(handler+0x40) (removed); reconfig is *(handler+0x28).
    assert ffi.offsetof("struct tcmulib_handler", field) == offset
    assert ffi.sizeof("struct tcmulib_handler") == 0x58


@pytest.mark.parametrize(
    "field,offset", [("cmd_id", 0), ("cdb", 8), ("iovec", 0x10), ("iov_cnt", 0x18), ("sense_buf", 0x20), ("hm_private", 0x80)]
)
def test_cmd_layout(field, offset):
    assert ffi.offsetof("struct tcmulib_cmd", field) == offset
    assert ffi.sizeof("struct tcmulib_cmd") == 0x88
    assert ffi.sizeof(ffi.typeof(ffi.new("struct tcmulib_cmd *").sense_buf)) == scsi.SENSE_BUFFERSIZE



def test_c_cdb_length_agrees_with_the_scsi_layer():
    # the binding sizes CDBs in C (obd_cmd_cdb_len); scsi.cdb_size is the reference
    cmd = ffi.new("struct tcmulib_cmd *")
    cdb = ffi.new("uint8_t[]", 264)
    cmd.cdb = cdb
    for op in range(256):
        for extra in (0, 24):
            cdb[0], cdb[7] = op, extra
            want = scsi.cdb_size(op, extra if op == 0x7F else None)
            assert lib.obd_cmd_cdb_len(cmd) == (want if want is not None else 6), (op, extra)

def test_cfg_info_layout():
    assert ffi.offsetof("struct tcmulib_cfg_info", "data") == 8
    assert ffi.sizeof("struct tcmulib_cfg_info") == 16


def test_handler_strings_match_upstream():
    assert binding.HANDLER_SUBTYPE == b"overlaybd"
    assert binding.HANDLER_CFG_DESC == b"overlaybd bs"
    assert binding.HANDLER_NAME == b"Handler for overlaybd devices"


# --- the fake kernel -------------------------------------------------------------------------

CMDR_OFF = 128
CMDR_SIZE = 64 * 1024
DATA_SIZE = 4 << 20
MAP_LEN = CMDR_OFF + CMDR_SIZE + DATA_SIZE
OP_PAD, OP_CMD = 0, 1
ENTRY_HDR = 8
REQ_IOV_OFF = 48  # naturally aligned req struct: cdb_off @24, iov[] @48 (libtcmu reads both there)
ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry): hdr 8 + rsp 104 (status, pads, read_len, sense[96])
DEV_STRUCT_SIZE = 0x1108


class FakeKernel:
    """The kernel's side of one TCMU device: mailbox, ring, data area, uio wakeups."""

    def __init__(self, cfgstring: str = "overlaybd//tmp/config.v1.json"):
        self.mem = mmap.mmap(-1, MAP_LEN)
        self.base = ffi.from_buffer(self.mem)
        struct.pack_into("<HHII", self.mem, 0, 2, 1, CMDR_OFF, CMDR_SIZE)  # version 2, CAP_OOOC
        self.head = 0
        self.seen_tail = 0
        self.data_next = 0
        self.next_id = 1
        self.pending: dict[int, list[tuple[int, int]]] = {}  # cmd_id → [(data offset, len)]
        self.responses: dict[int, tuple[int, bytes]] = {}
        self.user_sock, self.kern_sock = socket.socketpair()
        self.user_sock.setblocking(False)
        self.kern_sock.setblocking(False)
        self.dev = ffi.new(f"char[{DEV_STRUCT_SIZE}]")
        struct.pack_into("<i", ffi.buffer(self.dev), 0, self.user_sock.fileno())
        ffi.cast("void **", self.dev + 8)[0] = ffi.cast("void *", self.base)
        ffi.cast("size_t *", self.dev + 0x10)[0] = MAP_LEN
        ffi.buffer(self.dev + 0x49, 6)[:] = b"uio99\0"
        cfg = cfgstring.encode() + b"\0"
        ffi.buffer(self.dev + 0xE9, len(cfg))[:] = cfg
        self.ptr = ffi.cast("struct tcmu_device *", self.dev)
        self.notifications = 0
        self._notified: asyncio.Event | None = None

    # ring helpers
    @property
    def mb_cmd_tail(self) -> int:
        return struct.unpack_from("<I", self.mem, 64)[0]

    def _entry(self, length: int, op: int) -> int:
        off = CMDR_OFF + self.head
        struct.pack_into("<I", self.mem, off, length | op)
        return off

    def _advance(self, length: int) -> None:
        self.head = (self.head + length) % CMDR_SIZE
        struct.pack_into("<I", self.mem, 12, self.head)

    def pad(self, length: int) -> None:
        """A PAD entry (libtcmu must skip it)."""
        self._entry(length, OP_PAD)
        self._advance(length)

    def alloc(self, n: int) -> int:
        off = CMDR_OFF + CMDR_SIZE + self.data_next
        self.data_next += (n + 63) & ~63
        assert self.data_next <= DATA_SIZE
        return off

    def submit(self, cdb: bytes, *, data_out: bytes = b"", data_len: int | None = None, iov_split: list[int] | None = None) -> int:
        """Queue one command; its data buffer is data_len bytes (default len(data_out)) split
        into iovecs of the sizes in iov_split. Returns its cmd_id."""
        n = len(data_out) if data_len is None else data_len
        sizes = iov_split or ([n] if n else [])
        assert sum(sizes) == n
        iovs = []
        for s in sizes:
            iovs.append((self.alloc(s), s))
        pos = 0
        for off, s in iovs:
            chunk = data_out[pos : pos + s]
            self.mem[off : off + len(chunk)] = chunk
            pos += s
        # like the kernel: the base is at least sizeof(struct tcmu_cmd_entry) (112, the rsp
        # side of the union) so a response never spills into the next entry; the cdb follows
        base = max(REQ_IOV_OFF + 16 * len(iovs), ENTRY_SIZE)
        length = (base + len(cdb) + 7) & ~7
        assert self.head + length <= CMDR_SIZE
        cmd_id = self.next_id
        self.next_id += 1
        off = self._entry(length, OP_CMD)
        struct.pack_into("<HBB", self.mem, off + 4, cmd_id, 0, 0)
        cdb_off = off + base
        struct.pack_into("<III4xQQQ", self.mem, off + 8, len(iovs), 0, 0, cdb_off, 0, 0)  # cdb_off @24
        for i, (ioff, s) in enumerate(iovs):
            # iov_base is an offset into the mapping here; libtcmu adds the mapping's address
            struct.pack_into("<QQ", self.mem, off + REQ_IOV_OFF + 16 * i, ioff, s)
        self.mem[cdb_off : cdb_off + len(cdb)] = cdb
        self.pending[cmd_id] = iovs
        self._advance(length)
        return cmd_id

    def wake(self) -> None:
        self.kern_sock.send(b"\x01\x00\x00\x00")

    def collect(self) -> None:
        """Read the responses libtcmu wrote between our last view and the mailbox tail."""
        tail = self.mb_cmd_tail
        while self.seen_tail != tail:
            off = CMDR_OFF + self.seen_tail
            len_op = struct.unpack_from("<I", self.mem, off)[0]
            length, op = len_op & ~7, len_op & 7
            if op == OP_CMD:
                cmd_id = struct.unpack_from("<H", self.mem, off + 4)[0]
                status = self.mem[off + 8]
                sense = bytes(self.mem[off + 16 : off + 16 + 96])
                self.responses[cmd_id] = (status, sense)
            self.seen_tail = (self.seen_tail + length) % CMDR_SIZE

    def data_in(self, cmd_id: int) -> bytes:
        return b"".join(bytes(self.mem[o : o + s]) for o, s in self.pending[cmd_id])

    def _on_notify(self) -> None:
        try:
            while self.kern_sock.recv(4096):
                self.notifications += 1
        except BlockingIOError:
            pass
        self.collect()
        if self._notified is not None:
            self._notified.set()

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._notified = asyncio.Event()
        loop.add_reader(self.kern_sock.fileno(), self._on_notify)

    async def wait_for(self, *cmd_ids: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not all(c in self.responses for c in cmd_ids):
                self._notified.clear()
                await self._notified.wait()

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if loop is not None:
            loop.remove_reader(self.kern_sock.fileno())
        self.user_sock.close()
        self.kern_sock.close()


# --- raw libtcmu calls on the fake ring -------------------------------------------------------


def test_get_next_command_parses_our_ring():
    k = FakeKernel()
    dev = binding.Device(k.ptr)
    assert dev.fd == k.user_sock.fileno()
    assert dev.cfgstring == "overlaybd//tmp/config.v1.json"
    assert dev.uio_name == "uio99"
    assert dev.next_command() is None
    k.pad(64)
    cid = k.submit(rw10(0x2A, 3, 2), data_out=b"a" * 300 + b"b" * 724, iov_split=[300, 724])
    cmd = dev.next_command()
    assert cmd is not None and dev.next_command() is None
    assert cmd.cmd_id == cid
    assert cmd.cdb == rw10(0x2A, 3, 2)
    assert cmd.data_length == 1024
    assert cmd._cmd.iov_cnt == 2
    assert bytes(cmd.read_data_out(1024)) == b"a" * 300 + b"b" * 724
    assert bytes(cmd.read_data_out(10)) == b"a" * 10
    dev.complete(cmd, ScsiStatus.GOOD, None)
    k.collect()
    assert k.responses[cid][0] == ScsiStatus.GOOD
    k.close()


def test_complete_passes_our_sense_verbatim():
    k = FakeKernel()
    dev = binding.Device(k.ptr)
    cid = k.submit(rw10(0x28, 0, 1), data_len=512)
    cmd = dev.next_command()
    sense = scsi.build_sense(3, 0x11, 0, info=1234)
    dev.complete(cmd, ScsiStatus.CHECK_CONDITION, sense)
    k.collect()
    status, got = k.responses[cid]
    assert status == ScsiStatus.CHECK_CONDITION
    assert got[:18] == sense and got[18:] == bytes(96 - 18)
    k.close()


@pytest.mark.parametrize("status,expected", [(ScsiStatus.BUSY, 0x08), (ScsiStatus.TASK_SET_FULL, 0x28)])
def test_complete_busy_statuses(status, expected):
    k = FakeKernel()
    dev = binding.Device(k.ptr)
    cid = k.submit(bytes(6))
    dev.complete(dev.next_command(), status, None)
    k.collect()
    assert k.responses[cid][0] == expected
    k.close()


def test_write_data_in_scatters_and_zero_fills():
    k = FakeKernel()
    dev = binding.Device(k.ptr)
    cid = k.submit(rw10(0x28, 0, 2), data_out=b"\xee" * 1024, iov_split=[100, 200, 724])
    cmd = dev.next_command()
    payload = bytes(range(256)) * 2
    assert cmd.write_data_in(payload) == 512
    dev.complete(cmd, ScsiStatus.GOOD, None)
    assert k.data_in(cid) == payload + bytes(512)
    k.close()


def test_configure_sets_libtcmu_geometry():
    k = FakeKernel()
    dev = binding.Device(k.ptr)
    dev.configure(block_size=512, num_lbas=12345, unmap=True, write_cache=False)
    assert lib.tcmu_dev_get_block_size(k.ptr) == 512
    assert lib.tcmu_dev_get_num_lbas(k.ptr) == 12345
    assert lib.tcmu_dev_get_unmap_enabled(k.ptr)
    assert not lib.tcmu_dev_get_write_cache_enabled(k.ptr)
    assert struct.unpack_from("<QI", ffi.buffer(k.dev), 0x20) == (12345, 512)
    k.close()


def test_out_of_order_completion_overwrites_slot_id():
    k = FakeKernel()
    dev = binding.Device(k.ptr)
    a = k.submit(bytes(6))
    b = k.submit(bytes(6))
    ca, cb = dev.next_command(), dev.next_command()
    dev.complete(cb, ScsiStatus.GOOD, None)  # b first: written into a's slot with b's id
    k.collect()
    assert b in k.responses and a not in k.responses
    dev.complete(ca, ScsiStatus.CHECK_CONDITION, scsi.build_sense(5, 0x20, 0))
    k.collect()
    assert k.responses[a][0] == ScsiStatus.CHECK_CONDITION
    k.close()


# --- tcmu-obd's device loop over real libtcmu ------------------------------------------------------


async def start_device(k: FakeKernel, image: MemoryImage, policy: IoPolicy | None = None) -> TcmuDevice:
    loop = asyncio.get_running_loop()
    k.attach_loop(loop)
    handle = binding.Device(k.ptr)
    info = DeviceInfo(num_lbas=image.size // BS, read_only=image.read_only, wwn="0011223344", cfgstring=handle.cfgstring)
    device = TcmuDevice(handle, CommandProcessor(image, info, policy), name="uio99")
    device.start()
    return device


async def test_device_serves_reads_writes_and_emulated_commands():
    data = os.urandom(64 * BS)
    image = MemoryImage(64 * BS, data=data)
    k = FakeKernel()
    device = await start_device(k, image)
    inq = k.submit(bytes([0x12, 0, 0, 0, 36, 0]), data_len=96)
    rd = k.submit(rw10(0x28, 4, 3), data_len=3 * BS, iov_split=[BS + 7, 2 * BS - 7])
    new = os.urandom(2 * BS)
    wr = k.submit(rw10(0x2A, 10, 2), data_out=new, iov_split=[1000, 24])
    bad = k.submit(rw10(0x28, 64, 1), data_len=BS)
    k.wake()
    await k.wait_for(inq, rd, wr, bad)
    assert k.responses[inq][0] == ScsiStatus.GOOD
    assert k.data_in(inq) == scsi.standard_inquiry() + bytes(96 - 36)
    assert k.responses[rd][0] == ScsiStatus.GOOD and k.data_in(rd) == data[4 * BS : 7 * BS]
    assert k.responses[wr][0] == ScsiStatus.GOOD and image._buf[10 * BS : 12 * BS] == new
    status, sense = k.responses[bad]
    assert status == ScsiStatus.CHECK_CONDITION and scsi.parse_sense(sense) == scsi.LBA_OUT_OF_RANGE
    assert device.completed == 4
    assert k.notifications >= 1
    await device.aclose()
    assert device.state is DeviceState.CLOSED
    k.close(asyncio.get_running_loop())


async def test_device_read_only_write_is_data_protect_over_ring():
    image = MemoryImage(16 * BS, read_only=True)
    k = FakeKernel()
    device = await start_device(k, image)
    wr = k.submit(rw10(0x2A, 0, 1), data_out=bytes(BS))
    ms = k.submit(bytes([0x1A, 0, 0x3F, 0, 255, 0]), data_len=255)
    k.wake()
    await k.wait_for(wr, ms)
    assert scsi.parse_sense(k.responses[wr][1]) == scsi.WRITE_PROTECTED
    assert k.data_in(ms)[2] == 0x80
    await device.aclose()
    k.close(asyncio.get_running_loop())


class GatedImage(MemoryImage):
    """Reads wait for the gate: in-flight commands we can hold and release."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = asyncio.Event()
        self.waiting = 0
        self.arrived = asyncio.Event()

    async def read_into(self, offset, buf):
        self.waiting += 1
        self.arrived.set()
        await self.gate.wait()
        await super().read_into(offset, buf)


async def test_slow_command_does_not_block_others_and_close_waits_for_it():
    image = GatedImage(16 * BS, data=b"\x42" * (16 * BS))
    k = FakeKernel()
    device = await start_device(k, image, IoPolicy(read_timeout=30))
    slow = k.submit(rw10(0x28, 0, 1), data_len=BS)
    fast = k.submit(bytes(6))
    k.wake()
    await k.wait_for(fast)
    assert slow not in k.responses and device.inflight == 1
    closing = asyncio.ensure_future(device.aclose(grace=30))
    await asyncio.sleep(0)
    assert not closing.done()
    image.gate.set()
    await closing
    k.collect()
    assert k.responses[slow][0] == ScsiStatus.GOOD and k.data_in(slow) == b"\x42" * BS
    assert image.flushes == 1  # flushed on close
    k.close(asyncio.get_running_loop())


async def test_close_grace_expiry_aborts_inflight():
    image = GatedImage(16 * BS)
    k = FakeKernel()
    device = await start_device(k, image, IoPolicy(read_timeout=30))
    slow = k.submit(rw10(0x28, 0, 1), data_len=BS)
    k.wake()
    await image.arrived.wait()
    await device.aclose(grace=0.05)
    k.collect()
    status, sense = k.responses[slow]
    assert status == ScsiStatus.CHECK_CONDITION and scsi.parse_sense(sense) == scsi.COMMAND_ABORTED
    k.close(asyncio.get_running_loop())


async def test_device_isolation_between_two_devices():
    class Exploding(MemoryImage):
        async def read_into(self, offset, buf):
            raise RuntimeError("boom")

    good_img = MemoryImage(16 * BS, data=b"\x07" * (16 * BS))
    k1, k2 = FakeKernel(), FakeKernel()
    d1 = await start_device(k1, Exploding(16 * BS))
    d2 = await start_device(k2, good_img)
    c1 = k1.submit(rw10(0x28, 0, 1), data_len=BS)
    c2 = k2.submit(rw10(0x28, 0, 1), data_len=BS)
    k1.wake()
    k2.wake()
    await k1.wait_for(c1)
    await k2.wait_for(c2)
    assert scsi.parse_sense(k1.responses[c1][1]) == scsi.INTERNAL_TARGET_FAILURE
    assert k2.responses[c2][0] == ScsiStatus.GOOD and k2.data_in(c2) == b"\x07" * BS
    # device 1 still serves after the failure
    c3 = k1.submit(bytes(6))
    k1.wake()
    await k1.wait_for(c3)
    assert k1.responses[c3][0] == ScsiStatus.GOOD
    await d1.aclose()
    await d2.aclose()
    loop = asyncio.get_running_loop()
    k1.close(loop)
    k2.close(loop)


async def test_many_commands_one_batch():
    image = MemoryImage(256 * BS, data=os.urandom(256 * BS))
    k = FakeKernel()
    device = await start_device(k, image)
    ids = [k.submit(rw10(0x28, i, 1), data_len=BS) for i in range(100)]
    k.wake()
    await k.wait_for(*ids)
    for i, cid in enumerate(ids):
        assert k.data_in(cid) == bytes(image._buf[i * BS : (i + 1) * BS])
    assert k.notifications < 100  # coalesced wakeups
    await device.aclose()
    k.close(asyncio.get_running_loop())


# --- Daemon.attach with a real libtcmu device handle --------------------------------------------


async def test_daemon_attach_over_real_handle():
    image = MemoryImage(32 * BS, data=b"\x33" * (32 * BS))
    opened = []

    async def opener(config_path, global_config, *, scheduler=None):
        opened.append(config_path)
        return image

    d = Daemon(DaemonConfig(), opener=opener, global_config=object())
    d._loop = asyncio.get_running_loop()
    k = FakeKernel("overlaybd//var/lib/x/config.v1.json;dev7")
    k.attach_loop(d._loop)
    handle = binding.Device(k.ptr)
    assert await d.attach(handle) == 0
    assert opened == ["/var/lib/x/config.v1.json"]
    assert lib.tcmu_dev_get_num_lbas(k.ptr) == 32 and lib.tcmu_dev_get_block_size(k.ptr) == 512
    rc = k.submit(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_len=32)
    k.wake()
    await k.wait_for(rc)
    assert struct.unpack(">QI", k.data_in(rc)[:12]) == (31, 512)
    await d.detach(handle)
    assert not d.devices
    k.close(d._loop)


# --- end to end: real image stack (default opener) → real libtcmu → ring ------------------------------


def _fixtures():
    import json

    from tests.support.paths import FIXTURES_OBD

    return FIXTURES_OBD, json.loads((FIXTURES_OBD / "expected.json").read_text())


async def read_disk_over_ring(k: FakeKernel, size: int, chunk: int = 256 * 1024) -> bytes:
    out = bytearray()
    for off in range(0, size, chunk * 8):
        k.data_next = 0  # the data area is reused once the previous batch completed
        ids = []
        for o in range(off, min(off + chunk * 8, size), chunk):
            n = min(chunk, size - o)
            ids.append(k.submit(struct.pack(">BBQIBB", 0x88, 0, o // BS, n // BS, 0, 0), data_len=n))
        k.wake()
        await k.wait_for(*ids)
        for cid in ids:
            assert k.responses[cid][0] == ScsiStatus.GOOD
            out += k.data_in(cid)
        k.head = k.seen_tail = 0  # ring idle: rewind both sides together
        struct.pack_into("<I", k.mem, 12, 0)
        struct.pack_into("<I", k.mem, 64, 0)
        ffi.cast("uint32_t *", k.dev + 0x18)[0] = 0
    return bytes(out)


async def test_fixture_image_served_end_to_end(tmp_path):
    import hashlib

    from tcmu_obd.config import load_global_config

    fixtures, expected = _fixtures()
    spec = expected["pattern"]["images"]["p12"]
    config = fixtures / "pattern" / "configs" / "p12.lz4.zfile.config.v1.json"
    d = Daemon(DaemonConfig(), global_config=load_global_config(fixtures / "svc.overlaybd.json"))
    d._loop = asyncio.get_running_loop()
    k = FakeKernel(f"overlaybd/{config}")
    k.attach_loop(d._loop)
    handle = binding.Device(k.ptr)
    assert await d.attach(handle) == 0
    assert lib.tcmu_dev_get_num_lbas(k.ptr) * BS == spec["raw_size"]
    data = await read_disk_over_ring(k, spec["raw_size"])
    assert hashlib.sha256(data).hexdigest() == spec["raw_sha256"]
    wr = k.submit(rw10(0x2A, 0, 1), data_out=bytes(BS))
    k.wake()
    await k.wait_for(wr)
    assert scsi.parse_sense(k.responses[wr][1]) == scsi.WRITE_PROTECTED  # lowers only: read-only
    await d.detach(handle)
    k.close(d._loop)


async def test_missing_config_fails_attach(tmp_path):
    from tcmu_obd.config import GlobalConfig

    d = Daemon(DaemonConfig(), global_config=GlobalConfig())
    d._loop = asyncio.get_running_loop()
    k = FakeKernel(f"overlaybd/{tmp_path}/absent.json")
    assert await d.attach(binding.Device(k.ptr)) == -errno.EPERM
    assert not d.devices
    k.close()


async def test_writable_image_write_flush_persist_end_to_end(tmp_path):
    import shutil

    from tcmu_obd.config import load_global_config

    fixtures, _ = _fixtures()
    group = tmp_path / "pattern"
    shutil.copytree(fixtures / "pattern", group)
    for p in group.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    config = group / "configs" / "rw-p1.config.v1.json"
    gc = load_global_config(fixtures / "svc.overlaybd.json")
    payload = os.urandom(8 * BS)

    async def session(write: bool) -> bytes:
        d = Daemon(DaemonConfig(), global_config=gc)
        d._loop = asyncio.get_running_loop()
        k = FakeKernel(f"overlaybd/{config};rw1")
        k.attach_loop(d._loop)
        handle = binding.Device(k.ptr)
        assert await d.attach(handle) == 0
        assert not d.devices[handle.key].processor.info.read_only
        if write:
            wr = k.submit(rw10(0x2A, 100, 8), data_out=payload, iov_split=[BS * 3, BS * 5])
            k.wake()
            await k.wait_for(wr)
            assert k.responses[wr][0] == ScsiStatus.GOOD
        if not write:  # discard the first 2 blocks (what Linux sends for blkdiscard here)
            ws = k.submit(struct.pack(">BBQIBB", 0x93, 0x08, 100, 2, 0, 0), data_out=bytes(BS))
            sync = k.submit(rw10(0x35, 0, 0))
            k.wake()
            await k.wait_for(ws, sync)
            assert k.responses[ws][0] == ScsiStatus.GOOD and k.responses[sync][0] == ScsiStatus.GOOD
        rd = k.submit(rw10(0x28, 100, 8), data_len=8 * BS)
        k.wake()
        await k.wait_for(rd)
        got = k.data_in(rd)
        await d.detach(handle)  # flushes the upper and closes
        k.close(d._loop)
        return got

    assert await session(write=True) == payload
    # durable across close/reopen; then WRITE SAME(16)+UNMAP zeroes what it discards
    assert await session(write=False) == bytes(2 * BS) + payload[2 * BS :]


# --- daemon shutdown with commands in flight (libtcmu's control half faked, ring real) ---------------


async def _serve_with_gated_read(tmp_path):
    from tests.frontends.test_tcmu_daemon import FakeLib

    image = GatedImage(16 * BS, data=b"\x5a" * (16 * BS))

    async def opener(path, g, *, scheduler=None):
        return image

    k = FakeKernel()
    lib_ = FakeLib(existing=[binding.Device(k.ptr)])
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path), drain_timeout=30), opener=opener, global_config={}, binding=lib_)
    ready = asyncio.Event()
    serving = asyncio.ensure_future(d.serve(on_ready=lambda _: ready.set()))
    await ready.wait()
    k.attach_loop(asyncio.get_running_loop())
    cid = k.submit(rw10(0x28, 0, 1), data_len=BS)
    k.wake()
    await image.arrived.wait()
    return d, k, image, serving, cid


async def test_graceful_shutdown_finishes_inflight_commands(tmp_path):
    d, k, image, serving, cid = await _serve_with_gated_read(tmp_path)
    d.request_stop()
    await asyncio.sleep(0)
    assert not serving.done()
    image.gate.set()
    assert await serving == 0
    k.collect()
    assert k.responses[cid][0] == ScsiStatus.GOOD and k.data_in(cid) == b"\x5a" * BS
    assert image.flushes == 1
    k.close(asyncio.get_running_loop())


async def test_forced_shutdown_aborts_inflight_commands(tmp_path):
    d, k, image, serving, cid = await _serve_with_gated_read(tmp_path)
    d.request_stop(force=True)
    assert await serving == 0
    k.collect()
    status, sense = k.responses[cid]
    assert status == ScsiStatus.CHECK_CONDITION and scsi.parse_sense(sense) == scsi.COMMAND_ABORTED
    k.close(asyncio.get_running_loop())


async def test_read_into_larger_buffer_zero_fills_stale_data_area():
    image = MemoryImage(16 * BS, data=b"\x11" * (16 * BS))
    k = FakeKernel()
    device = await start_device(k, image)
    k.mem[CMDR_OFF + CMDR_SIZE : CMDR_OFF + CMDR_SIZE + 8 * BS] = b"\xee" * (8 * BS)  # stale bytes
    rd = k.submit(rw10(0x28, 0, 1), data_len=4 * BS, iov_split=[BS // 2, 3 * BS + BS // 2])
    inq = k.submit(bytes([0x12, 0, 0, 0, 200, 0]), data_len=200)
    k.wake()
    await k.wait_for(rd, inq)
    assert k.data_in(rd) == b"\x11" * BS + bytes(3 * BS)
    assert k.data_in(inq) == scsi.standard_inquiry() + bytes(200 - 36)
    await device.aclose()
    k.close(asyncio.get_running_loop())


# --- batched drain: READs answered in place ------------------------------------------------------


def test_ring_area_is_the_devices_mapping():
    """RingOps.area comes from libtcmu's tcmu_dev_get_memory_info: the whole uio mapping."""
    k = FakeKernel()
    ring = binding.Device(k.ptr).ring()
    assert len(ring.area) == MAP_LEN
    ring.area[MAP_LEN - 4 :] = b"tail"
    assert k.mem[MAP_LEN - 4 :] == b"tail"
    k.close()


def test_peek_reports_in_place_reads_only_when_they_qualify():
    k = FakeKernel()
    ring = binding.Device(k.ptr).ring()
    num_lbas = 100
    good = k.submit(rw10(0x28, 7, 2), data_len=2 * BS)
    k.submit(rw16(0x88, 98, 2), data_len=2 * BS)  # in range: 98 + 2 = 100
    k.submit(rw16(0x88, 99, 2), data_len=2 * BS)  # past the end
    k.submit(rw10(0x28, 1, 2), data_len=2 * BS, iov_split=[BS, BS])  # two iovecs
    k.submit(rw10(0x28, 1, 2), data_len=BS)  # buffer shorter than the transfer
    k.submit(rw10(0x28, 1, 0))  # nothing to transfer
    k.submit(rw10(0x2A, 1, 1), data_out=bytes(BS))  # a WRITE
    n = ring.start(num_lbas, 9)
    assert n == 7
    rows = [tuple(ring.info[4 * i : 4 * i + 4]) for i in range(n)]
    skip = ring.NOT_IN_PLACE
    assert rows[0][0] == 7 * BS and rows[0][1] == 2 * BS and rows[0][3] == 0x28
    assert rows[1][:2] == (98 * BS, 2 * BS) and rows[1][3] == 0x88
    assert [r[0] for r in rows[2:]] == [skip] * 5
    assert [r[3] for r in rows] == [0x28, 0x88, 0x88, 0x28, 0x28, 0x28, 0x2A]
    # the reported buffer offset is where the command's data lives in the mapping
    ring.area[rows[0][2] : rows[0][2] + 2 * BS] = b"\x5a" * (2 * BS)
    ring.complete_in_place(0, 2 * BS)
    k.collect()
    assert k.responses[good][0] == ScsiStatus.GOOD and k.data_in(good) == b"\x5a" * (2 * BS)
    for i in range(1, n):
        binding.Device(k.ptr).complete(ring.adopt(i), ScsiStatus.GOOD, None)
    k.close()


class NowaitImage(MemoryImage):
    """A MemoryImage with the synchronous read the image stack has (Image.read_into_nowait):
    reads at `decline` LBAs scribble on the buffer and decline (the async path must redo them),
    reads at `fail` LBAs raise from both paths."""

    def __init__(self, *a, decline=(), fail=(), **kw):
        super().__init__(*a, **kw)
        self.decline, self.fail = set(decline), set(fail)
        self.nowait_calls = self.async_calls = 0

    def read_into_nowait(self, offset, buf):
        self.nowait_calls += 1
        lba = offset // BS
        if lba in self.fail:
            raise RuntimeError(f"bad block {lba}")
        if lba in self.decline:
            buf[: min(len(buf), 7)] = b"garbage"[: len(buf)]
            return False
        buf[:] = self._buf[offset : offset + len(buf)]
        return True

    async def read_into(self, offset, buf):
        self.async_calls += 1
        if offset // BS in self.fail:
            raise RuntimeError(f"bad block {offset // BS}")
        await super().read_into(offset, buf)


async def test_batched_drain_answers_reads_in_place_and_everything_else_as_before():
    from tcmu_obd.ops.counters import SCSI_COMMANDS

    data = os.urandom(256 * BS)
    image = NowaitImage(256 * BS, data=data)
    k = FakeKernel()
    device = await start_device(k, image)
    assert device._ring is not None  # the real binding offers the batched drain
    good_before = SCSI_COMMANDS.counts.get(("uio99", 0x28, ScsiStatus.GOOD), 0)
    expect: dict[int, tuple[int, bytes]] = {}
    # more commands than one C call takes (RingOps.batch): the drain goes round again
    for i in range(40):
        lba, n = (i * 37) % 250, 1 + i % 4
        cid = k.submit(rw10(0x28, lba, n), data_out=b"\xee" * (n * BS))  # stale bytes in the data area
        expect[cid] = (ScsiStatus.GOOD, data[lba * BS : (lba + n) * BS])
    r16 = k.submit(rw16(0x88, 200, 8), data_len=8 * BS)
    expect[r16] = (ScsiStatus.GOOD, data[200 * BS : 208 * BS])
    # a data buffer longer than the transfer: the rest is zeroed, not left stale
    longer = k.submit(rw10(0x28, 3, 1), data_out=b"\xee" * (3 * BS))
    expect[longer] = (ScsiStatus.GOOD, data[3 * BS : 4 * BS] + bytes(2 * BS))
    # two iovecs: the general path (scatter copy)
    split = k.submit(rw10(0x28, 9, 2), data_len=2 * BS, iov_split=[BS + 7, BS - 7])
    expect[split] = (ScsiStatus.GOOD, data[9 * BS : 11 * BS])
    zero = k.submit(rw10(0x28, 5, 0))
    past = k.submit(rw10(0x28, 255, 2), data_len=2 * BS)
    inq = k.submit(bytes([0x12, 0, 0, 0, 36, 0]), data_len=36)
    k.wake()
    await k.wait_for(*expect, zero, past, inq)
    for cid, (status, payload) in expect.items():
        assert k.responses[cid][0] == status, cid
        assert k.data_in(cid) == payload, cid
    assert k.responses[zero][0] == ScsiStatus.GOOD
    assert scsi.parse_sense(k.responses[past][1]) == scsi.LBA_OUT_OF_RANGE
    assert k.data_in(inq) == scsi.standard_inquiry()
    assert device.completed == len(expect) + 3
    assert image.async_calls == 0  # every read was answered without a coroutine
    # in-place reads are counted like the others: every READ(10) but the one past the end
    # (the READ(16) in `expect` counts under its own opcode; the zero-length READ(10) is GOOD)
    reads10_good = len(expect) - 1 + 1
    assert SCSI_COMMANDS.counts[("uio99", 0x28, ScsiStatus.GOOD)] - good_before == reads10_good
    assert SCSI_COMMANDS.counts[("uio99", 0x88, ScsiStatus.GOOD)] >= 1
    await device.aclose()
    k.close(asyncio.get_running_loop())


async def test_batched_drain_hands_declined_and_failing_reads_to_the_general_path():
    data = os.urandom(64 * BS)
    image = NowaitImage(64 * BS, data=data, decline={10}, fail={20})
    k = FakeKernel()
    device = await start_device(k, image)
    before = k.submit(rw10(0x28, 2, 2), data_len=2 * BS)
    declined = k.submit(rw10(0x28, 10, 3), data_len=3 * BS)
    failing = k.submit(rw10(0x28, 20, 1), data_len=BS)
    after = k.submit(rw10(0x28, 30, 1), data_len=BS)
    k.wake()
    await k.wait_for(before, declined, failing, after)
    assert k.data_in(before) == data[2 * BS : 4 * BS]
    assert k.responses[declined][0] == ScsiStatus.GOOD
    assert k.data_in(declined) == data[10 * BS : 13 * BS]  # the scribble was overwritten
    status, sense = k.responses[failing]
    assert status == ScsiStatus.CHECK_CONDITION and scsi.parse_sense(sense) == scsi.INTERNAL_TARGET_FAILURE
    assert k.data_in(after) == data[30 * BS : 31 * BS]
    assert image.async_calls >= 2  # the declined and the failing read took the async path
    # the device keeps serving in place afterwards
    again = k.submit(rw10(0x28, 40, 1), data_len=BS)
    k.wake()
    await k.wait_for(again)
    assert k.data_in(again) == data[40 * BS : 41 * BS]
    await device.aclose()
    k.close(asyncio.get_running_loop())


async def test_device_serves_one_command_at_a_time_when_the_batched_drain_is_unavailable():
    class NoRing(binding.Device):
        __slots__ = ()

        def ring(self):
            raise binding.TcmuError("libtcmu: no memory map information for the device")

    data = os.urandom(16 * BS)
    image = NowaitImage(16 * BS, data=data)
    k = FakeKernel()
    k.attach_loop(asyncio.get_running_loop())
    handle = NoRing(k.ptr)
    info = DeviceInfo(num_lbas=16, read_only=False, wwn="0011223344", cfgstring=handle.cfgstring)
    device = TcmuDevice(handle, CommandProcessor(image, info), name="uio99")
    assert device._ring is None
    device.start()
    rd = k.submit(rw10(0x28, 3, 2), data_len=2 * BS)
    k.wake()
    await k.wait_for(rd)
    assert k.responses[rd][0] == ScsiStatus.GOOD and k.data_in(rd) == data[3 * BS : 5 * BS]
    await device.aclose()
    k.close(asyncio.get_running_loop())
