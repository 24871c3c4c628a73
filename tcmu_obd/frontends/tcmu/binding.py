"""Thin wrapper over the cffi module `_libtcmu` (libtcmu.so.2, tcmu-runner 1.5.4).

Theory of operation
-------------------
libtcmu owns the netlink socket and the per-device uio mmap; we register one handler
(subtype "overlaybd") whose `added`/`removed` callbacks are cffi `extern "Python"`
functions. cffi callbacks are process-global, so they dispatch to whatever object was
passed to `initialize()` (the daemon); there is one libtcmu context per process.

Threading contract (see daemon.py): every libtcmu *control* call (tcmulib_initialize,
tcmulib_master_fd_ready, tcmulib_close) runs on a lane thread, so `added`/`removed` run
there too and may block waiting for the event loop; every *data-path* call (processing
start/complete, get_next_command, command_complete) runs on the event-loop thread.

Command memory: `tcmulib_get_next_command` mallocs one block (struct + iovec array + cdb);
`tcmulib_command_complete` writes the response into the ring and frees it. A CommandHandle
is therefore dead after `complete()`; its iovecs point into the device's data area and are
valid only until then.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
from typing import Any, Protocol

from ...errors import ObdError
from .scsi import SENSE_BUFFERSIZE, ScsiStatus

log = logging.getLogger(__name__)

try:
    from ._libtcmu import ffi, lib  # type: ignore[import-not-found]
except ImportError as _exc:  # pragma: no cover - exercised only on a broken install
    ffi = lib = None
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

HANDLER_NAME = b"Handler for overlaybd devices"
HANDLER_SUBTYPE = b"overlaybd"
HANDLER_CFG_DESC = b"overlaybd bs"

# libtcmu's TCMU_STS_* (libtcmu_common.h), the subset we complete with
TCMU_STS_OK = 0
TCMU_STS_NO_RESOURCE = 1
TCMU_STS_PASSTHROUGH_ERR = 2  # CHECK CONDITION with our own sense_buf, copied verbatim
TCMU_STS_BUSY = 3


class TcmuError(ObdError):
    """libtcmu could not be used (module not built, kernel support missing, init failed)."""


def require_binding() -> None:
    """Raises: TcmuError when the compiled module is missing (not built/installed)."""
    if lib is None:
        raise TcmuError(
            f"the libtcmu binding is not built ({_IMPORT_ERROR}); reinstall tcmu-obd with "
            "libtcmu2 installed (pip install . builds tcmu_obd.frontends.tcmu._libtcmu)"
        )


class DeviceCallbacks(Protocol):
    def on_added(self, dev: "Device") -> int: ...

    def on_removed(self, dev: "Device") -> None: ...


_target: DeviceCallbacks | None = None
_target_lock = threading.Lock()


if lib is not None:

    @ffi.def_extern()
    def obd_py_added(dev_ptr):  # called by libtcmu (lane thread)
        target = _target
        if target is None:
            return -errno.EPERM
        try:
            return int(target.on_added(Device(dev_ptr)))
        except BaseException:  # never unwind into C
            log.exception("added callback failed")
            return -errno.EPERM

    @ffi.def_extern()
    def obd_py_removed(dev_ptr):  # called by libtcmu (lane thread)
        target = _target
        if target is None:
            return
        try:
            target.on_removed(Device(dev_ptr))
        except BaseException:
            log.exception("removed callback failed")


class Context:
    """A libtcmu context (tcmulib_initialize … tcmulib_close)."""

    def __init__(self, ctx_ptr: Any, keepalive: list[Any]):
        self._ctx = ctx_ptr
        self._keepalive = keepalive  # the handler struct and its strings must outlive ctx

    @property
    def master_fd(self) -> int:
        return lib.tcmulib_get_master_fd(self._ctx)

    def master_fd_ready(self) -> int:
        """Process pending netlink messages (may call added/removed). Lane thread only."""
        return lib.tcmulib_master_fd_ready(self._ctx)

    def close(self) -> None:
        """Block each device, wait for its ring to drain, call removed, free. Lane thread only."""
        global _target
        if self._ctx is None:
            return
        lib.tcmulib_close(self._ctx)
        self._ctx = None
        with _target_lock:
            _target = None


def initialize(target: DeviceCallbacks) -> Context:
    """Register the overlaybd handler; `added` runs (in this thread) for devices that already
    exist. Raises: TcmuError if libtcmu cannot talk to the kernel (no TCM-USER netlink family).
    """
    global _target
    require_binding()
    with _target_lock:
        if _target is not None:
            raise TcmuError("a libtcmu context is already open in this process")
        _target = target
    name = ffi.new("char[]", HANDLER_NAME)
    subtype = ffi.new("char[]", HANDLER_SUBTYPE)
    desc = ffi.new("char[]", HANDLER_CFG_DESC)
    handler = ffi.new("struct tcmulib_handler *")
    handler.name = name
    handler.subtype = subtype
    handler.cfg_desc = desc
    handler.check_config = ffi.NULL
    handler.reconfig = ffi.NULL
    handler.update_logdir = ffi.NULL
    handler.added = lib.obd_py_added
    handler.removed = lib.obd_py_removed
    ctx = lib.tcmulib_initialize(handler, 1)
    if ctx == ffi.NULL:
        with _target_lock:
            _target = None
        raise TcmuError(
            "tcmulib_initialize failed: the kernel's TCM-USER netlink family is not available "
            "(is target_core_user loaded?)"
        )
    return Context(ctx, [name, subtype, desc, handler])


def set_module_param(name: str, value: int) -> bool:
    """Write /sys/module/target_core_user/parameters/<name> (block_netlink, reset_netlink).
    Returns False when the kernel lacks the parameter."""
    require_binding()
    return lib.tcmu_cfgfs_mod_param_set_u32(name.encode(), value) == 0


class Device:
    """A `struct tcmu_device *` (owned by libtcmu; valid until `removed` returns)."""

    __slots__ = ("_dev", "_ring")

    def __init__(self, dev_ptr: Any):
        self._dev = dev_ptr
        self._ring: RingOps | None = None

    @property
    def key(self) -> int:
        return int(ffi.cast("uintptr_t", self._dev))

    @property
    def fd(self) -> int:
        return lib.tcmu_dev_get_fd(self._dev)

    @property
    def cfgstring(self) -> str:
        return ffi.string(lib.tcmu_dev_get_cfgstring(self._dev)).decode("utf-8", "surrogateescape")

    @property
    def uio_name(self) -> str:
        return ffi.string(lib.tcmu_dev_get_uio_name(self._dev)).decode("utf-8", "replace")

    def wwn(self) -> str | None:
        """configfs wwn/vpd_unit_serial, or None when unreadable."""
        p = lib.tcmu_cfgfs_dev_get_wwn(self._dev)
        if p == ffi.NULL:
            return None
        try:
            return ffi.string(p).decode("ascii", "replace")
        finally:
            lib.free(p)

    def configure(self, *, block_size: int, num_lbas: int, unmap: bool, write_cache: bool) -> None:
        lib.tcmu_dev_set_block_size(self._dev, block_size)
        lib.tcmu_dev_set_num_lbas(self._dev, num_lbas)
        lib.tcmu_dev_set_unmap_enabled(self._dev, unmap)
        lib.tcmu_dev_set_write_cache_enabled(self._dev, write_cache)

    def processing_start(self) -> None:
        lib.tcmulib_processing_start(self._dev)

    def processing_complete(self) -> None:
        lib.tcmulib_processing_complete(self._dev)

    def next_command(self) -> "CommandHandle | None":
        p = lib.tcmulib_get_next_command(self._dev, 0)
        if p == ffi.NULL:
            return None
        return CommandHandle(p)

    def ring(self) -> "RingOps":
        """The batched drain over this device (TcmuDevice uses it when the handle has one)."""
        if self._ring is None:
            self._ring = RingOps(self._dev)
        return self._ring

    def complete_good(self, cmd: "CommandHandle", data: bytes | bytearray | memoryview | None) -> None:
        """GOOD with data-in, in one C call: scatter data into the iovecs, zero what is left
        of them, complete and free the command (cmd is dead afterwards)."""
        ptr, cmd._cmd = cmd._cmd, None
        if data:
            lib.obd_complete_data_in(self._dev, ptr, ffi.from_buffer(data), len(data))
        else:
            lib.obd_complete_data_in(self._dev, ptr, ffi.NULL, 0)

    def complete(self, cmd: "CommandHandle", status: int, sense: bytes | None) -> None:
        """Write the response and free the command (cmd is dead afterwards)."""
        if status == ScsiStatus.GOOD:
            result = TCMU_STS_OK
        elif status == ScsiStatus.CHECK_CONDITION:
            s = sense or b""
            lib.obd_set_sense(cmd._cmd, s, len(s))
            result = TCMU_STS_PASSTHROUGH_ERR
        elif status == ScsiStatus.TASK_SET_FULL:
            result = TCMU_STS_NO_RESOURCE
        else:
            result = TCMU_STS_BUSY
        ptr, cmd._cmd = cmd._cmd, None
        lib.tcmulib_command_complete(self._dev, ptr, result)


class RingOps:
    """The ring calls of TcmuDevice's batched drain, bound to one device.

    `start(num_lbas, block_shift)` acknowledges the uio event and takes up to a batch of
    queued commands in one C call (`more(...)` takes the next batch); `info` then holds 4
    words per command: the disk offset of a READ that may be answered in place (NOT_IN_PLACE
    otherwise), its length, its buffer's offset in the data area (`area`, a writable view of
    the whole mapping) and the opcode. `complete_in_place(i, filled)` answers command i GOOD,
    `adopt(i)` makes a CommandHandle of it for the general path, `notify()` wakes the kernel.
    The attributes are bound C calls, so the drain loop pays no Python frame for them."""

    NOT_IN_PLACE = (1 << 64) - 1
    __slots__ = ("batch", "info", "area", "start", "more", "complete_in_place", "notify", "_cmds", "_info_c")

    def __init__(self, dev_ptr: Any, batch: int = 32):
        base, length = ffi.new("void **"), ffi.new("size_t *")
        name = lib.tcmu_dev_get_memory_info(dev_ptr, base, length, ffi.NULL)
        if name == ffi.NULL:
            raise TcmuError("libtcmu: no memory map information for the device")
        lib.free(name)
        area_ptr = ffi.cast("uint8_t *", base[0])
        area_len = length[0]
        self.batch = batch
        self.area = memoryview(ffi.buffer(area_ptr, area_len))
        self._cmds = ffi.new("struct tcmulib_cmd *[]", batch)
        self._info_c = ffi.new("uint64_t[]", 4 * batch)
        self.info = memoryview(ffi.buffer(self._info_c)).cast("Q")
        self.start = functools.partial(lib.obd_start_and_peek, dev_ptr, self._cmds, self._info_c, batch,
                                       area_ptr, area_len)
        self.more = functools.partial(lib.obd_peek_commands, dev_ptr, self._cmds, self._info_c, batch,
                                      area_ptr, area_len)
        self.complete_in_place = functools.partial(lib.obd_complete_in_place, dev_ptr, self._cmds)
        self.notify = functools.partial(lib.tcmulib_processing_complete, dev_ptr)

    def adopt(self, i: int) -> "CommandHandle":
        return CommandHandle(self._cmds[i])


class CommandHandle:
    """One `struct tcmulib_cmd *` from tcmulib_get_next_command (see module doc for lifetime)."""

    __slots__ = ("_cmd", "cdb", "data_length", "cmd_id")

    def __init__(self, cmd_ptr: Any):
        self._cmd = cmd_ptr
        self.cdb = bytes(ffi.buffer(cmd_ptr.cdb, lib.obd_cmd_cdb_len(cmd_ptr)))
        self.data_length = lib.obd_cmd_iov_len(cmd_ptr)
        self.cmd_id = cmd_ptr.cmd_id

    def read_data_out(self, length: int) -> bytearray:
        """Copy up to `length` bytes of data-out (the iovecs) into a new buffer."""
        buf = bytearray(min(length, self.data_length))
        if buf:
            lib.obd_copy_from_iovec(self._cmd, ffi.from_buffer(buf), len(buf))
        return buf

    def write_data_in(self, data: bytes | bytearray | memoryview | None) -> int:
        """Copy data into the iovecs and zero whatever is left of them. Returns bytes copied."""
        n = 0
        if data:
            n = lib.obd_copy_to_iovec(self._cmd, ffi.from_buffer(data), len(data))
        if n < self.data_length:
            lib.obd_zero_iovec_from(self._cmd, n)
        return n

    @property
    def sense_buf(self) -> bytes:
        return bytes(ffi.buffer(self._cmd.sense_buf, SENSE_BUFFERSIZE))
