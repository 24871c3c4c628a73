"""The frontends' choke points feed the command counters: a TCMU device's completions (fake
ring handle, real CommandProcessor and SCSI code) by opcode and status."""

from __future__ import annotations

import asyncio
import socket
import struct

from tcmu_obd.frontends.tcmu.commands import CommandProcessor
from tcmu_obd.frontends.tcmu.device import TcmuDevice
from tcmu_obd.frontends.tcmu.scsi import DeviceInfo
from tcmu_obd.image.memory import MemoryImage
from tcmu_obd.ops.counters import SCSI_COMMANDS


class Cmd:
    def __init__(self, cdb: bytes):
        self.cdb = cdb
        self.data_length = 4096
        self.data_in = None

    def write_data_in(self, data):
        self.data_in = bytes(data or b"")

    def read_data_out(self, n):
        return bytes(n)


class Ring:
    """The smallest binding.Device: a queue of commands and a list of completions."""

    def __init__(self, cmds):
        self._a, self._b = socket.socketpair()
        self.fd = self._a.fileno()
        self.queue = list(cmds)
        self.done: list[tuple[Cmd, int]] = []
        self.all_done = asyncio.Event()
        self.expected = len(self.queue)

    def processing_start(self):
        pass

    def next_command(self):
        return self.queue.pop(0) if self.queue else None

    def _record(self, cmd, status):
        self.done.append((cmd, status))
        if len(self.done) == self.expected:
            self.all_done.set()

    def complete_good(self, cmd, data):
        cmd.write_data_in(data)
        self._record(cmd, 0)

    def complete(self, cmd, status, sense):
        self._record(cmd, status)

    def processing_complete(self):
        pass

    def close(self):
        self._a.close()
        self._b.close()


async def test_tcmu_completions_are_counted_by_opcode_and_status():
    image = MemoryImage(1 << 20, b"x" * 4096)
    proc = CommandProcessor(image, DeviceInfo(num_lbas=(1 << 20) // 512))
    read10 = bytes([0x28, 0]) + struct.pack(">I", 0) + bytes([0]) + struct.pack(">H", 8) + bytes([0])
    ring = Ring([Cmd(bytes(6)), Cmd(read10), Cmd(bytes([0xFF]) + bytes(5))])  # TUR, READ(10), unknown
    SCSI_COMMANDS.clear()
    dev = TcmuDevice(ring, proc, name="lun-metrics")
    dev.start()
    try:
        await asyncio.wait_for(ring.all_done.wait(), 10)
    finally:
        await dev.aclose(1.0)
        ring.close()
    counts = dict(SCSI_COMMANDS.items())
    assert counts == {("lun-metrics", 0x00, 0): 1, ("lun-metrics", 0x28, 0): 1, ("lun-metrics", 0xFF, 2): 1}
