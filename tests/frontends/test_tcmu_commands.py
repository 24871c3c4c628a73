"""commands.py: decode → image → Response/sense, against MemoryImage.

The command object is a fake (cdb, data buffer) because the host has no TCMU kernel; the
same CommandProcessor runs behind real libtcmu commands in test_tcmu_binding.py's ring test
and in the VM rig.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import ImageIOError, RemoteTimeout
from tcmu_obd.frontends.tcmu import scsi
from tcmu_obd.frontends.tcmu.commands import CommandProcessor, IoPolicy, Response, is_retriable
from tcmu_obd.frontends.tcmu.scsi import DeviceInfo, ScsiStatus
from tcmu_obd.image.memory import MemoryImage
from tests.support.cdb import rw10, rw16

BS = 512
NBLK = 256
SIZE = NBLK * BS


class FakeCommand:
    """cdb + a data buffer of data_length bytes (data-out for writes)."""

    def __init__(self, cdb: bytes, data_length: int = 0, data_out: bytes = b""):
        self.cdb = cdb
        self.data_length = data_length
        self._out = data_out
        self.reads_of_data_out = 0

    def read_data_out(self, length: int) -> bytes:
        self.reads_of_data_out += 1
        return self._out[: min(length, self.data_length)]


def make(read_only=False, data=None, policy=None, image=None):
    img = image or MemoryImage(SIZE, data=data, read_only=read_only)
    info = DeviceInfo(num_lbas=img.size // BS, read_only=img.read_only, wwn="abc", cfgstring="overlaybd//x")
    return img, CommandProcessor(img, info, policy or IoPolicy(read_timeout=2.0, write_timeout=2.0))


def sense_of(r: Response):
    assert r.status == ScsiStatus.CHECK_CONDITION
    return scsi.parse_sense(r.sense)


PATTERN = os.urandom(SIZE)


# -- synchronous (emulated) commands ----------------------------------------------------------


@pytest.mark.parametrize(
    "cdb",
    [
        bytes(6),  # TEST UNIT READY
        bytes([0x12, 0, 0, 0, 36, 0]),
        struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0),
        bytes([0x25]) + bytes(9),
        bytes([0x1A, 0, 0x3F, 0, 255, 0]),
        bytes([0x1B, 0, 0, 0, 1, 0]),
        bytes([0x03, 0, 0, 0, 18, 0]),
    ],
)
def test_emulated_commands_answer_synchronously(cdb):
    _, p = make()
    r = p.submit(FakeCommand(cdb, 255))
    assert isinstance(r, Response) and r.status == ScsiStatus.GOOD


def test_read_capacity_reports_image_size():
    _, p = make()
    r = p.submit(FakeCommand(bytes([0x25]) + bytes(9), 8))
    assert r.data == struct.pack(">II", NBLK - 1, BS)


def test_unknown_opcode():
    _, p = make()
    for op in (0xA3, 0xA4, 0x89, 0x5E, 0x01):
        r = p.submit(FakeCommand(bytes([op]) + bytes(15)))
        assert sense_of(r) == scsi.INVALID_COMMAND_OPCODE


def test_reserved_group_opcode():
    _, p = make()
    assert sense_of(p.submit(FakeCommand(bytes([0x60]) + bytes(15)))) == scsi.INVALID_COMMAND_OPCODE


def test_mode_sense_wp_follows_image():
    _, p = make(read_only=True)
    r = p.submit(FakeCommand(bytes([0x1A, 0, 0x3F, 0, 255, 0]), 255))
    assert r.data[2] == 0x80


def test_mode_select_round_trip_and_short_data():
    _, p = make()
    page = scsi.mode_page(0x08, p.info)
    data = bytes(4) + page
    r = p.submit(FakeCommand(bytes([0x15, 0x10, 0, 0, len(data), 0]), len(data), data))
    assert r.status == ScsiStatus.GOOD
    r = p.submit(FakeCommand(bytes([0x15, 0x10, 0, 0, len(data), 0]), 4, data))
    assert sense_of(r) == scsi.PARAM_LIST_LENGTH_ERROR


# -- READ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cdb,lba,n",
    [
        (bytes([0x08, 0, 0, 3, 2, 0]), 3, 2),
        (rw10(0x28, 10, 4), 10, 4),
        (struct.pack(">BBIIBB", 0xA8, 0, 20, 3, 0, 0), 20, 3),
        (rw16(0x88, NBLK - 1, 1), NBLK - 1, 1),
    ],
)
async def test_read_variants(cdb, lba, n):
    _, p = make(data=PATTERN)
    r = await p.execute(FakeCommand(cdb, n * BS))
    assert r.status == ScsiStatus.GOOD
    assert bytes(r.data) == PATTERN[lba * BS : (lba + n) * BS]


async def test_read6_zero_means_256_blocks():
    _, p = make(data=PATTERN)
    r = await p.execute(FakeCommand(bytes([0x08, 0, 0, 0, 0, 0]), 256 * BS))
    assert bytes(r.data) == PATTERN[: 256 * BS]


async def test_read_out_of_range():
    _, p = make()
    for cdb in (rw10(0x28, NBLK, 1), rw10(0x28, NBLK - 1, 2), rw16(0x88, (1 << 64) - 1, 1)):
        r = await p.execute(FakeCommand(cdb, 2 * BS))
        assert sense_of(r) == scsi.LBA_OUT_OF_RANGE


async def test_read_zero_length():
    _, p = make()
    r = await p.execute(FakeCommand(rw10(0x28, 5, 0), 0))
    assert r.status == ScsiStatus.GOOD and not r.data


async def test_read_into_shorter_buffer_serves_what_fits():
    _, p = make(data=PATTERN)
    r = await p.execute(FakeCommand(rw10(0x28, 0, 4), 3 * BS))
    assert bytes(r.data) == PATTERN[: 3 * BS]


async def test_read_into_longer_buffer_serves_transfer_length():
    _, p = make(data=PATTERN)
    r = await p.execute(FakeCommand(rw10(0x28, 0, 2), 8 * BS))
    assert bytes(r.data) == PATTERN[: 2 * BS]  # the device layer zero-fills the rest


class FlakyImage(MemoryImage):
    def __init__(self, *a, failures=0, exc_factory=None, **kw):
        super().__init__(*a, **kw)
        self.failures = failures
        self.attempts = 0
        self.exc_factory = exc_factory or (lambda: ImageIOError("transient", errno.EIO))

    async def read_into(self, offset, buf):
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.exc_factory()
        await super().read_into(offset, buf)


@pytest.mark.parametrize(
    "exc_factory",
    [
        lambda: ImageIOError("eio", errno.EIO),
        lambda: ImageIOError("again", errno.EAGAIN),
        lambda: RemoteTimeout("slow registry"),
        lambda: ConnectionResetError(errno.ECONNRESET, "reset"),
    ],
)
async def test_read_retries_transient_errors(exc_factory):
    img = FlakyImage(SIZE, data=PATTERN, failures=3, exc_factory=exc_factory)
    _, p = make(image=img, policy=IoPolicy(read_timeout=5.0, retry_initial_delay=0.001))
    r = await p.execute(FakeCommand(rw10(0x28, 1, 1), BS))
    assert r.status == ScsiStatus.GOOD and bytes(r.data) == PATTERN[BS : 2 * BS]
    assert img.attempts == 4


async def test_read_gives_up_with_medium_error_within_budget():
    img = FlakyImage(SIZE, failures=10**9)
    _, p = make(image=img, policy=IoPolicy(read_timeout=0.3, retry_initial_delay=0.005, retry_max_delay=0.05))
    t0 = time.monotonic()
    r = await p.execute(FakeCommand(rw10(0x28, 7, 1), BS))
    elapsed = time.monotonic() - t0
    assert sense_of(r) == scsi.UNRECOVERED_READ_ERROR
    assert struct.unpack(">I", r.sense[3:7])[0] == 7 and r.sense[0] & 0x80
    assert img.attempts > 2
    assert elapsed < 2.0


async def test_read_non_retriable_error_fails_at_once():
    img = FlakyImage(SIZE, failures=10**9, exc_factory=lambda: ImageIOError("bad range", errno.EINVAL))
    _, p = make(image=img)
    r = await p.execute(FakeCommand(rw10(0x28, 0, 1), BS))
    assert sense_of(r) == scsi.UNRECOVERED_READ_ERROR
    assert img.attempts == 1


class HangingImage(MemoryImage):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.started = 0
        self.arrived = asyncio.Event()

    async def read_into(self, offset, buf):
        self.started += 1
        self.arrived.set()
        await asyncio.Event().wait()

    async def write(self, offset, data):
        await asyncio.Event().wait()


async def test_hanging_read_is_bounded():
    img = HangingImage(SIZE)
    _, p = make(image=img, policy=IoPolicy(read_timeout=0.2))
    r = await asyncio.wait_for(p.execute(FakeCommand(rw10(0x28, 0, 1), BS)), 5)
    assert sense_of(r) == scsi.UNRECOVERED_READ_ERROR
    assert img.started == 1


async def test_hanging_write_is_bounded():
    img = HangingImage(SIZE)
    _, p = make(image=img, policy=IoPolicy(write_timeout=0.2))
    r = await asyncio.wait_for(p.execute(FakeCommand(rw10(0x2A, 0, 1), BS, bytes(BS))), 5)
    assert sense_of(r) == scsi.WRITE_ERROR


async def test_bug_in_image_is_hardware_error():
    class Buggy(MemoryImage):
        async def read_into(self, offset, buf):
            raise KeyError("oops")

    _, p = make(image=Buggy(SIZE))
    r = await p.execute(FakeCommand(rw10(0x28, 0, 1), BS))
    assert sense_of(r) == scsi.INTERNAL_TARGET_FAILURE


async def test_cancellation_passes_through():
    img = HangingImage(SIZE)
    _, p = make(image=img, policy=IoPolicy(read_timeout=60))
    task = asyncio.ensure_future(p.execute(FakeCommand(rw10(0x28, 0, 1), BS)))
    await img.arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task



# -- eager READ: answered in submit() when the image needs no wait ---------------------------------


@pytest.mark.parametrize(
    "cdb",
    [
        rw10(0x28, 3, 2),
        rw16(0x88, 3, 2),
        struct.pack(">BBIIBB", 0xA8, 0, 3, 2, 0, 0),  # READ(12)
        struct.pack(">BBHBB", 0x08, 0, 3, 2, 0),  # READ(6)
    ],
)
def test_local_read_is_answered_synchronously(cdb):
    # no event loop at all: a read the image serves without waiting never needs one
    _, p = make(data=PATTERN)
    r = p.submit(FakeCommand(cdb, 2 * BS))
    assert isinstance(r, Response) and r.status == ScsiStatus.GOOD
    assert bytes(r.data) == PATTERN[3 * BS : 5 * BS]


def test_eager_read_range_check_still_applies():
    _, p = make(data=PATTERN)
    for cdb in (rw10(0x28, NBLK - 1, 2), rw16(0x88, 2**63, 1)):
        r = p.submit(FakeCommand(cdb, 2 * BS))
        assert isinstance(r, Response) and sense_of(r) == scsi.LBA_OUT_OF_RANGE


class GatedImage(MemoryImage):
    """Copies the first half of a read, waits for the gate, then copies the rest."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = asyncio.Event()

    async def read_into(self, offset, buf):
        half = len(buf) // 2
        await super().read_into(offset, buf[:half])
        await self.gate.wait()
        await super().read_into(offset + half, buf[half:])


async def test_read_that_waits_continues_in_a_task():
    img = GatedImage(SIZE, data=PATTERN)
    _, p = make(image=img)
    r = p.submit(FakeCommand(rw10(0x28, 4, 4), 4 * BS))
    assert not isinstance(r, Response)  # suspended on the gate: the rest runs in a task
    task = asyncio.ensure_future(r)
    await asyncio.sleep(0)
    assert not task.done()
    img.gate.set()
    resp = await task
    assert resp.status == ScsiStatus.GOOD and bytes(resp.data) == PATTERN[4 * BS : 8 * BS]


async def test_suspended_read_still_has_a_deadline():
    img = GatedImage(SIZE, data=PATTERN)
    _, p = make(image=img, policy=IoPolicy(read_timeout=0.1))
    r = p.submit(FakeCommand(rw10(0x28, 9, 1), BS))
    resp = await asyncio.wait_for(r, 5)
    assert sense_of(resp) == scsi.UNRECOVERED_READ_ERROR
    assert struct.unpack(">I", resp.sense[3:7])[0] == 9


async def test_eager_step_that_needs_a_task_is_read_again_in_one():
    class NeedsTask(MemoryImage):
        attempts = 0

        async def read_into(self, offset, buf):
            self.attempts += 1
            async with asyncio.timeout(5):  # RuntimeError outside a task
                await super().read_into(offset, buf)

    img = NeedsTask(SIZE, data=PATTERN)
    _, p = make(image=img)
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    # submit from a plain loop callback, as device.py does, so no task is current
    loop.call_soon(lambda: fut.set_result(p.submit(FakeCommand(rw10(0x28, 2, 1), BS))))
    r = await fut
    assert not isinstance(r, Response)
    resp = await r
    assert resp.status == ScsiStatus.GOOD and bytes(resp.data) == PATTERN[2 * BS : 3 * BS]
    assert img.attempts == 2

def test_is_retriable():
    assert is_retriable(ImageIOError("x", errno.EIO))
    assert not is_retriable(ImageIOError("x", errno.EINVAL))
    assert is_retriable(TimeoutError())
    assert not is_retriable(ValueError())
    assert not is_retriable(ImageIOError("x", errno.EROFS))


# -- WRITE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cdb,lba,n",
    [
        (bytes([0x0A, 0, 0, 3, 2, 0]), 3, 2),
        (rw10(0x2A, 10, 4), 10, 4),
        (struct.pack(">BBIIBB", 0xAA, 0, 20, 3, 0, 0), 20, 3),
        (rw16(0x8A, NBLK - 1, 1), NBLK - 1, 1),
        (rw10(0x2E, 30, 2), 30, 2),  # WRITE AND VERIFY(10)
    ],
)
async def test_write_variants(cdb, lba, n):
    img, p = make()
    data = os.urandom(n * BS)
    cmd = FakeCommand(cdb, n * BS, data)
    r = await p.execute(cmd)
    assert r.status == ScsiStatus.GOOD
    out = bytearray(n * BS)
    await img.read_into(lba * BS, memoryview(out))
    assert bytes(out) == data


async def test_write_read_only_is_data_protect():
    img, p = make(read_only=True)
    cmd = FakeCommand(rw10(0x2A, 0, 1), BS, bytes(BS))
    r = await p.execute(cmd)
    assert sense_of(r) == scsi.WRITE_PROTECTED
    assert cmd.reads_of_data_out == 0


async def test_write_out_of_range():
    _, p = make()
    r = await p.execute(FakeCommand(rw10(0x2A, NBLK, 1), BS, bytes(BS)))
    assert sense_of(r) == scsi.LBA_OUT_OF_RANGE


async def test_write_short_data_out_is_invalid_field():
    img, p = make(data=PATTERN)
    r = await p.execute(FakeCommand(rw10(0x2A, 0, 2), BS, bytes(BS)))
    assert sense_of(r) == scsi.INVALID_FIELD_IN_CDB
    out = bytearray(BS)
    await img.read_into(0, memoryview(out))
    assert bytes(out) == PATTERN[:BS]  # nothing written


async def test_write_fua_flushes():
    img, p = make()
    await p.execute(FakeCommand(rw10(0x2A, 0, 1, flags=0x08), BS, bytes(BS)))
    assert img.flushes == 1
    await p.execute(FakeCommand(rw10(0x2A, 0, 1), BS, bytes(BS)))
    assert img.flushes == 1


async def test_write_zero_blocks_is_good():
    img, p = make()
    r = await p.execute(FakeCommand(rw10(0x2A, 0, 0), 0))
    assert r.status == ScsiStatus.GOOD


@pytest.mark.parametrize(
    "err,expected",
    [
        (ImageIOError("disk", errno.EIO), scsi.WRITE_ERROR),
        (ImageIOError("full", errno.ENOSPC), scsi.SPACE_ALLOCATION_FAILED),
        (ImageIOError("ro", errno.EROFS), scsi.WRITE_PROTECTED),
        (OSError(errno.EIO, "x"), scsi.WRITE_ERROR),
    ],
)
async def test_write_errors(err, expected):
    class Failing(MemoryImage):
        async def write(self, offset, data):
            raise err

    _, p = make(image=Failing(SIZE))
    r = await p.execute(FakeCommand(rw10(0x2A, 4, 1), BS, bytes(BS)))
    assert sense_of(r) == expected


# -- SYNCHRONIZE CACHE / UNMAP / WRITE SAME / VERIFY ------------------------------------------------


async def test_synchronize_cache():
    img, p = make()
    r = await p.execute(FakeCommand(rw10(0x35, 0, 0)))
    assert r.status == ScsiStatus.GOOD and img.flushes == 1
    r = await p.execute(FakeCommand(rw16(0x91, 0, 0)))
    assert img.flushes == 2
    r = await p.execute(FakeCommand(rw10(0x35, NBLK, 1)))
    assert sense_of(r) == scsi.LBA_OUT_OF_RANGE


async def test_synchronize_cache_read_only_is_noop():
    img, p = make(read_only=True)
    r = await p.execute(FakeCommand(rw10(0x35, 0, 0)))
    assert r.status == ScsiStatus.GOOD and img.flushes == 0


async def test_flush_error_is_write_error():
    class Failing(MemoryImage):
        async def flush(self):
            raise ImageIOError("fsync", errno.EIO)

    _, p = make(image=Failing(SIZE))
    assert sense_of(await p.execute(FakeCommand(rw10(0x35, 0, 0)))) == scsi.WRITE_ERROR


def unmap_cmd(*ranges):
    descs = b"".join(struct.pack(">QII", lba, n, 0) for lba, n in ranges)
    data = struct.pack(">HHI", len(descs) + 6, len(descs), 0) + descs
    return FakeCommand(struct.pack(">BBIBHB", 0x42, 0, 0, 0, len(data), 0), len(data), data)


async def test_unmap_discards():
    img, p = make(data=b"\xff" * SIZE)
    r = await p.execute(unmap_cmd((2, 3), (10, 1)))
    assert r.status == ScsiStatus.GOOD
    assert img._buf[2 * BS : 5 * BS] == bytes(3 * BS) and img._buf[10 * BS : 11 * BS] == bytes(BS)
    assert img._buf[5 * BS] == 0xFF and img._buf[BS] == 0xFF


async def test_unmap_read_only_and_range():
    _, p = make(read_only=True)
    assert sense_of(await p.execute(unmap_cmd((0, 1)))) == scsi.WRITE_PROTECTED
    _, p = make()
    assert sense_of(await p.execute(unmap_cmd((NBLK - 1, 2)))) == scsi.LBA_OUT_OF_RANGE


async def test_write_same_unmap_discards():
    img, p = make(data=b"\xff" * SIZE)
    r = await p.execute(FakeCommand(rw16(0x93, 4, 8, flags=0x08), BS, bytes(BS)))
    assert r.status == ScsiStatus.GOOD
    assert img._buf[4 * BS : 12 * BS] == bytes(8 * BS) and img._buf[12 * BS] == 0xFF


async def test_write_same_writes_pattern():
    img, p = make()
    pat = os.urandom(BS)
    r = await p.execute(FakeCommand(rw10(0x41, 3, 5), BS, pat))
    assert r.status == ScsiStatus.GOOD
    assert img._buf[3 * BS : 8 * BS] == pat * 5 and img._buf[8 * BS : 9 * BS] == bytes(BS)


async def test_write_same_nonzero_pattern_with_unmap_is_written():
    img, p = make()
    pat = b"\x01" * BS
    r = await p.execute(FakeCommand(rw16(0x93, 0, 2, flags=0x08), BS, pat))
    assert r.status == ScsiStatus.GOOD and img._buf[: 2 * BS] == pat * 2


async def test_write_same_large_range_is_chunked():
    big = MemoryImage(8 << 20)
    _, p = make(image=big)
    pat = b"\x5a" * BS
    r = await p.execute(FakeCommand(rw16(0x93, 0, (8 << 20) // BS), BS, pat))
    assert r.status == ScsiStatus.GOOD and big._buf == bytearray(pat * ((8 << 20) // BS))


async def test_write_same_ndob_zeroes():
    img, p = make(data=b"\xff" * SIZE)
    r = await p.execute(FakeCommand(rw16(0x93, 0, 2, flags=0x01), 0))
    assert r.status == ScsiStatus.GOOD and img._buf[: 2 * BS] == bytes(2 * BS)


@pytest.mark.parametrize(
    "cmd,expected,read_only",
    [
        (FakeCommand(rw16(0x93, 0, 0, flags=0x08), BS, bytes(BS)), scsi.INVALID_FIELD_IN_CDB, False),
        (FakeCommand(rw16(0x93, NBLK, 1, flags=0x08), BS, bytes(BS)), scsi.LBA_OUT_OF_RANGE, False),
        (FakeCommand(rw16(0x93, 0, 1, flags=0x10), BS, bytes(BS)), scsi.INVALID_FIELD_IN_CDB, False),
        (FakeCommand(rw10(0x41, 0, 1), 0), scsi.INVALID_FIELD_IN_CDB, False),
        (FakeCommand(rw16(0x93, 0, 1, flags=0x08), BS, bytes(BS)), scsi.WRITE_PROTECTED, True),
    ],
)
async def test_write_same_errors(cmd, expected, read_only):
    _, p = make(read_only=read_only)
    assert sense_of(await p.execute(cmd)) == expected


async def test_verify():
    _, p = make(data=PATTERN)
    assert (await p.execute(FakeCommand(rw10(0x2F, 0, 4)))).status == ScsiStatus.GOOD
    assert sense_of(await p.execute(FakeCommand(rw10(0x2F, NBLK, 1)))) == scsi.LBA_OUT_OF_RANGE
    good = FakeCommand(rw10(0x2F, 1, 2, flags=0x02), 2 * BS, PATTERN[BS : 3 * BS])
    assert (await p.execute(good)).status == ScsiStatus.GOOD
    bad_data = bytearray(PATTERN[BS : 3 * BS])
    bad_data[700] ^= 1
    r = await p.execute(FakeCommand(rw10(0x2F, 1, 2, flags=0x02), 2 * BS, bytes(bad_data)))
    assert sense_of(r) == (scsi.SenseKey.MISCOMPARE, 0x1D, 0)
    assert struct.unpack(">I", r.sense[3:7])[0] == 700
    assert sense_of(await p.execute(FakeCommand(rw10(0x2F, 1, 2, flags=0x04), 2 * BS))) == scsi.INVALID_FIELD_IN_CDB


async def test_bug_in_image_write_is_hardware_error():
    class Buggy(MemoryImage):
        async def write(self, offset, data):
            raise AttributeError("oops")

    _, p = make(image=Buggy(SIZE))
    r = await p.execute(FakeCommand(rw10(0x2A, 0, 1), BS, bytes(BS)))
    assert sense_of(r) == scsi.INTERNAL_TARGET_FAILURE


def test_wwn_is_read_at_each_vpd_request():
    serials = iter(["first", "second"])
    img = MemoryImage(SIZE)
    p = CommandProcessor(img, DeviceInfo(num_lbas=NBLK), wwn_source=lambda: next(serials))
    std = p.submit(FakeCommand(bytes([0x12, 0, 0, 0, 36, 0]), 36))  # standard INQUIRY: not asked
    assert std.status == ScsiStatus.GOOD
    assert p.submit(FakeCommand(bytes([0x12, 1, 0x80, 0, 255, 0]), 255)).data[4:] == b"first\0"
    assert b"LIO-ORG second" in p.submit(FakeCommand(bytes([0x12, 1, 0x83, 0, 255, 0]), 255)).data

_OPS = sorted(int(o) for o in scsi.Op) + [0x00, 0x7F, 0x89, 0xFF]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(_OPS),
    rest=st.binary(min_size=0, max_size=20),
    data=st.binary(max_size=2048),
    extra=st.integers(min_value=0, max_value=1024),
    read_only=st.booleans(),
)
def test_fuzz_any_cdb_gives_a_well_formed_response(op, rest, data, extra, read_only):
    """Whatever arrives, the processor answers GOOD or CHECK CONDITION with parseable sense
    and never touches data outside the disk."""
    img = MemoryImage(16 * BS, data=PATTERN[: 16 * BS], read_only=read_only)
    p = CommandProcessor(img, DeviceInfo(num_lbas=16, read_only=read_only), IoPolicy(read_timeout=1, write_timeout=1))
    cmd = FakeCommand(bytes([op]) + rest, len(data) + extra, data)
    r = asyncio.run(p.execute(cmd))
    assert r.status in (ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION)
    if r.status == ScsiStatus.CHECK_CONDITION:
        key, asc, ascq = scsi.parse_sense(r.sense)
        assert key in (scsi.SenseKey.ILLEGAL_REQUEST, scsi.SenseKey.DATA_PROTECT, scsi.SenseKey.MISCOMPARE)
    elif r.data is not None:
        assert len(r.data) <= max(cmd.data_length, 0xFFFF)
    if read_only:
        assert img._buf == bytearray(PATTERN[: 16 * BS])


async def test_deadline_leaves_the_task_uncancelled_and_the_watchdog_empty():
    img = HangingImage(SIZE)
    _, p = make(image=img, policy=IoPolicy(read_timeout=0.05, write_timeout=0.05))
    r1 = await p.execute(FakeCommand(rw10(0x28, 0, 1), BS))
    r2 = await p.execute(FakeCommand(rw10(0x2A, 0, 1), BS, bytes(BS)))
    assert sense_of(r1) == scsi.UNRECOVERED_READ_ERROR and sense_of(r2) == scsi.WRITE_ERROR
    assert asyncio.current_task().cancelling() == 0
    assert not p._watchdog._deadlines and not p._watchdog._expired
    # and the processor keeps working
    _, p2 = make(data=PATTERN, policy=IoPolicy(read_timeout=0.05))
    assert bytes((await p2.execute(FakeCommand(rw10(0x28, 2, 1), BS))).data) == PATTERN[2 * BS : 3 * BS]


async def test_retries_stop_at_the_deadline_even_while_sleeping():
    img = FlakyImage(SIZE, failures=10**9)
    _, p = make(image=img, policy=IoPolicy(read_timeout=0.1, retry_initial_delay=0.05, retry_max_delay=10))
    t0 = time.monotonic()
    r = await p.execute(FakeCommand(rw10(0x28, 0, 1), BS))
    assert sense_of(r) == scsi.UNRECOVERED_READ_ERROR
    assert time.monotonic() - t0 < 1.0
