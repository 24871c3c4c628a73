"""The TCMU frontend's command-processing core: a decoded command in, a Response out.

Theory of operation
-------------------
`CommandProcessor.submit(cmd)` looks at the opcode and either answers at once (emulated
commands: INQUIRY, READ CAPACITY, MODE SENSE…, and every CHECK CONDITION found by
decoding) by returning a `Response`, or returns a coroutine for commands that touch the
image (READ/WRITE/VERIFY/WRITE SAME/UNMAP/SYNCHRONIZE CACHE). The caller (device.py) runs
coroutines as tasks and copies `Response.data` into the command's data-in buffer.

`cmd` is anything with `cdb: bytes`, `data_length: int` (total bytes of the command's data
buffer, i.e. the iovec length) and `read_data_out(n) -> bytes`. Data-out is copied once,
synchronously, before the first await: nothing here keeps a reference to the command's
buffers across an await, so a device being torn down can never see a late write into
its ring.

Error mapping (every failure is a CHECK CONDITION with fixed sense; never an exception out
of here, except cancellation):
- decode/range problems → ILLEGAL REQUEST (scsi.CheckCondition);
- writes/discards on a read-only image (or ReadOnlyError/EROFS) → DATA PROTECT 27/00;
  ENOSPC → DATA PROTECT 27/07;
- reads: retriable errors (see `is_retriable`) are retried with exponential backoff within
  `IoPolicy.read_timeout`; then, and for other image errors, MEDIUM ERROR 11/00 with the LBA;
- writes/flush/discard errors → MEDIUM ERROR 0C/00; no retry (the upper's state is unknown);
- an image call that outlives its bound (`IoPolicy.read_timeout`/`write_timeout`) is
  cancelled and answered with the same MEDIUM ERROR: a command never hangs forever;
- any other exception (a bug) → HARDWARE ERROR 44/00 (INTERNAL TARGET FAILURE), logged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
import types
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ...errors import ChecksumError, DigestMismatch, ImageIOError, ObdError, ReadOnlyError, RemoteError
from ...image.source import nowait_reader
from . import scsi
from .scsi import CheckCondition, DeviceInfo, Op, ScsiStatus

log = logging.getLogger(__name__)

WRITE_SAME_CHUNK_BYTES = 1 << 20
_RW10 = struct.Struct(">BBIBHB")  # opcode, flags, LBA, group, transfer length, control
_RW16 = struct.Struct(">BBQIBB")  # opcode, flags, LBA, transfer length, group, control

RETRIABLE_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)


def is_retriable(exc: BaseException) -> bool:
    """A read failure worth retrying: transient I/O and network errors, timeouts, and
    corrupt fetched data (a refetch may heal it). Not: range/format errors, read-only, bugs."""
    if isinstance(exc, ReadOnlyError):
        return False
    if isinstance(exc, ImageIOError):
        return exc.errno in RETRIABLE_ERRNOS
    if isinstance(exc, (RemoteError, TimeoutError, ConnectionError, ChecksumError, DigestMismatch)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in RETRIABLE_ERRNOS
    return False


@dataclass(frozen=True, slots=True)
class IoPolicy:
    """Bounds for image calls. Defaults stay well under the kernel's default cmd_time_out (30 s)."""

    read_timeout: float = 20.0  # total budget for a read, retries included
    write_timeout: float = 20.0  # per write/flush/discard call
    retry_initial_delay: float = 0.02
    retry_max_delay: float = 1.0


class Command(Protocol):
    cdb: bytes
    data_length: int

    def read_data_out(self, length: int) -> bytes: ...


@dataclass(slots=True)
class Response:
    status: int = ScsiStatus.GOOD
    data: bytes | bytearray | None = None  # data-in, copied into the command's buffer
    sense: bytes | None = None

    @classmethod
    def check(cls, exc: CheckCondition) -> "Response":
        return cls(ScsiStatus.CHECK_CONDITION, None, exc.sense)


GOOD = Response()


class CommandProcessor:
    """Per-device SCSI command execution against a BlockImage."""

    def __init__(
        self,
        image: Any,
        info: DeviceInfo,
        policy: IoPolicy | None = None,
        *,
        name: str = "tcmu",
        wwn_source: Callable[[], str | None] | None = None,
    ):
        """`wwn_source`, when given, is asked for the unit serial at each INQUIRY VPD 0x80/0x83
        (as libtcmu does: configfs may set the serial after the device was enabled)."""
        self.image = image
        # the image's synchronous read (Image.read_into_nowait), tried before the coroutine
        self._read_nowait = nowait_reader(image)
        self.info = info
        self.wwn_source = wwn_source
        self.policy = policy or IoPolicy()
        tick = min(0.25, self.policy.read_timeout / 4, self.policy.write_timeout / 4)
        self._watchdog = _Watchdog(max(tick, 0.005))
        self.name = name
        self.bs = info.block_size

    # -- dispatch ---------------------------------------------------------------------------

    @property
    def read_nowait(self) -> Callable[[int, memoryview], bool] | None:
        """The image's synchronous read (Image.read_into_nowait(offset, buf) -> bool), or None.
        The TCMU device's batched drain answers READs with it straight into the command's
        buffer; a decline or an error sends the command down the general path (submit)."""
        return self._read_nowait

    def submit(self, cmd: Command) -> Response | Coroutine[Any, Any, Response]:
        """Returns a Response for commands answered synchronously, else a coroutine to run."""
        try:
            return self._dispatch(cmd)
        except CheckCondition as exc:
            return Response.check(exc)
        except Exception as exc:  # a bug in decoding must not take the device down
            log.exception("%s: internal error on CDB %s", self.name, bytes(cmd.cdb[:16]).hex())
            return Response.check(CheckCondition(scsi.INTERNAL_TARGET_FAILURE, str(exc)))

    async def execute(self, cmd: Command) -> Response:
        """submit() and await the result (convenience for tests and simple callers)."""
        r = self.submit(cmd)
        if isinstance(r, Response):
            return r
        return await r

    def _dispatch(self, cmd: Command) -> Response | Coroutine[Any, Any, Response]:
        cdb = bytes(cmd.cdb)
        n = len(cdb)
        op = cdb[0] if n else -1
        # READ(10)/READ(16), what Linux sends for nearly every read: decoded inline, as the
        # general decoder's RwCommand costs as much as a cached 4 KiB read itself
        if op == 0x28 and n >= 10:
            _, _, lba, _, blocks, _ = _RW10.unpack_from(cdb)
            if lba + blocks > self.info.num_lbas:
                scsi.check_range(lba, blocks, self.info.num_lbas)
            return self._read_now(lba, blocks, cmd.data_length)
        if op == 0x88 and n >= 16:
            _, _, lba, blocks, _, _ = _RW16.unpack_from(cdb)
            if lba + blocks > self.info.num_lbas:
                scsi.check_range(lba, blocks, self.info.num_lbas)
            return self._read_now(lba, blocks, cmd.data_length)
        scsi.cdb_length(cdb)  # reserved groups → INVALID COMMAND OPERATION CODE
        info = self.info
        if op in scsi.READ_OPS:
            rw = scsi.decode_rw(cdb)
            scsi.check_range(rw.lba, rw.blocks, info.num_lbas)
            return self._read_now(rw.lba, rw.blocks, cmd.data_length)
        if op in scsi.WRITE_OPS:
            rw = scsi.decode_rw(cdb)
            scsi.check_range(rw.lba, rw.blocks, info.num_lbas)
            self._check_writable()
            want = rw.blocks * self.bs
            if cmd.data_length < want:
                raise CheckCondition(
                    scsi.INVALID_FIELD_IN_CDB, f"data-out {cmd.data_length} B < transfer length {want} B"
                )
            if want == 0:
                return GOOD
            data = cmd.read_data_out(want)
            return self._guard(rw.lba, self._write, rw, data)
        if op in scsi.VERIFY_OPS:
            return self._verify(cdb, cmd)
        if op in (Op.WRITE_SAME_10, Op.WRITE_SAME_16):
            return self._write_same(cdb, cmd)
        if op == Op.UNMAP:
            self._check_writable()
            ranges = scsi.parse_unmap(cdb, cmd.read_data_out(min(cmd.data_length, scsi.parameter_list_length(cdb))), info)
            if not ranges:
                return GOOD
            return self._guard(ranges[0][0], self._unmap, ranges)
        if op in (Op.SYNCHRONIZE_CACHE_10, Op.SYNCHRONIZE_CACHE_16):
            rw = scsi.decode_rw(cdb)
            scsi.check_range(rw.lba, rw.blocks, info.num_lbas)
            if info.read_only:
                return GOOD
            return self._guard(None, self._flush)
        if op == Op.TEST_UNIT_READY:
            return GOOD
        if op == Op.INQUIRY:
            if self.wwn_source is not None and len(cdb) > 2 and cdb[1] & 0x01 and cdb[2] in (0x80, 0x83):
                wwn = self.wwn_source()
                if wwn is not None and wwn != info.wwn:
                    info = self.info = replace(info, wwn=wwn)
            return Response(data=scsi.inquiry(cdb, info))
        if op == Op.SERVICE_ACTION_IN_16:
            return Response(data=scsi.read_capacity_16(cdb, info))
        if op == Op.READ_CAPACITY_10:
            return Response(data=scsi.read_capacity_10(cdb, info))
        if op in (Op.MODE_SENSE_6, Op.MODE_SENSE_10):
            return Response(data=scsi.mode_sense(cdb, info))
        if op in (Op.MODE_SELECT_6, Op.MODE_SELECT_10):
            plen = scsi.parameter_list_length(cdb)
            if plen > cmd.data_length:
                raise CheckCondition(scsi.PARAM_LIST_LENGTH_ERROR, "parameter list longer than data-out")
            scsi.mode_select_check(cdb, cmd.read_data_out(plen), info)
            return GOOD
        if op == Op.REQUEST_SENSE:
            return Response(data=scsi.request_sense(cdb))
        if op in (Op.START_STOP_UNIT, Op.PREVENT_ALLOW_MEDIUM_REMOVAL):
            return GOOD
        raise CheckCondition(scsi.INVALID_COMMAND_OPCODE, f"opcode {op:#04x} not supported", field=0)

    def _check_writable(self) -> None:
        if self.info.read_only:
            raise CheckCondition(scsi.WRITE_PROTECTED, "image is read-only")

    # -- error mapping for image calls ----------------------------------------------------------

    async def _guard(self, lba: int | None, fn: Callable[..., Coroutine[Any, Any, Response]], *args: Any,
                     **kwargs: Any) -> Response:
        """Run an image coroutine fn(*args, **kwargs); map every failure to a CHECK CONDITION
        (cancellation passes). fn is called only once this runs: a command cancelled before
        its task started leaves no coroutine behind that was never awaited."""
        try:
            return await fn(*args, **kwargs)
        except CheckCondition as exc:
            return Response.check(exc)
        except ReadOnlyError as exc:
            return Response.check(CheckCondition(scsi.WRITE_PROTECTED, str(exc)))
        except _WriteFailed as exc:
            cause = exc.__cause__
            if isinstance(cause, (ImageIOError, OSError)) and cause.errno == errno.EROFS:
                return Response.check(CheckCondition(scsi.WRITE_PROTECTED, str(cause)))
            if isinstance(cause, (ImageIOError, OSError)) and cause.errno == errno.ENOSPC:
                return Response.check(CheckCondition(scsi.SPACE_ALLOCATION_FAILED, str(cause)))
            log.warning("%s: write error at LBA %s: %r", self.name, lba, cause)
            return Response.check(CheckCondition(scsi.WRITE_ERROR, str(cause), info=_info(lba)))
        except _ReadFailed as exc:
            log.warning("%s: read error at LBA %s: %r", self.name, lba, exc.__cause__)
            return Response.check(CheckCondition(scsi.UNRECOVERED_READ_ERROR, str(exc), info=_info(lba)))
        except Exception as exc:
            log.exception("%s: internal error at LBA %s", self.name, lba)
            return Response.check(CheckCondition(scsi.INTERNAL_TARGET_FAILURE, str(exc)))

    # -- image commands ----------------------------------------------------------------------

    def _read_now(self, lba: int, blocks: int, data_length: int) -> Response | Coroutine[Any, Any, Response]:
        """Eager READ: the image's read coroutine takes its first step right here. When the
        data is local (cache hit, local file, hole) it finishes in that step and the READ is
        answered synchronously, with no task and no loop turn (most of a small read's cost).
        Only a read that really waits (a fetch, a decode in a thread) or fails becomes a
        coroutine: the suspended read goes on inside the caller's task, with the deadline
        watchdog and retries of the slow path.

        The eager step runs outside any task (asyncio.current_task() is None). Image code
        that needs a task there (asyncio.timeout, aiohttp's timers) raises RuntimeError; such
        a non-I/O error from the eager step makes the task read again (`_read_with_retry`)."""
        length = min(blocks * self.bs, data_length)
        buf = bytearray(length)
        if not length:
            return Response(data=buf)
        offset = lba * self.bs
        mv = memoryview(buf)
        nowait = self._read_nowait
        if nowait is not None:  # cheaper still than one coroutine step: no coroutine at all
            try:
                if nowait(offset, mv):
                    return Response(data=buf)
            except Exception as exc:
                return self._guard(lba, self._read_rest, offset, buf, failed=exc)
        coro = self.image.read_into(offset, mv)
        try:
            pending = coro.send(None)
        except StopIteration:
            return Response(data=buf)
        except Exception as exc:
            return self._guard(lba, self._read_rest, offset, buf, failed=exc)
        return self._guard(lba, self._read_rest, offset, buf, resumed=_resume(coro, pending))

    async def _read_rest(self, offset: int, buf: bytearray, *, resumed: Any = None,
                         failed: Exception | None = None) -> Response:
        await self._read_with_retry(offset, buf, resumed=resumed, failed=failed)
        return Response(data=buf)

    async def _read_with_retry(self, offset: int, buf: bytearray, *, resumed: Any = None,
                               failed: Exception | None = None) -> None:
        """Fill buf from the image, retrying transient failures with backoff until the read
        budget runs out. The first attempt may already have been made eagerly (`_read_now`):
        `resumed` is that attempt, suspended, to be awaited; `failed` is how it failed.
        Raises: _ReadFailed (cause: the last error or the timeout)."""
        policy = self.policy
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.read_timeout
        task = asyncio.current_task()
        assert task is not None
        self._watchdog.watch(task, deadline, loop)
        delay = policy.retry_initial_delay
        attempt = 0
        if failed is not None and not is_retriable(failed) and not isinstance(failed, (ObdError, OSError)):
            failed = None  # not an I/O error: maybe the eager step lacked a task; read again here
        try:
            while True:
                attempt += 1
                try:
                    if resumed is not None:
                        first, resumed = resumed, None
                        await first
                    elif failed is not None:
                        first_exc, failed = failed, None
                        raise first_exc
                    else:
                        await self.image.read_into(offset, memoryview(buf))
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not is_retriable(exc):
                        if isinstance(exc, (ObdError, OSError)):
                            raise _ReadFailed(f"read at {offset} failed: {exc}") from exc
                        raise  # a bug, not an I/O error: INTERNAL TARGET FAILURE
                    last: BaseException = exc
                if loop.time() + delay >= deadline:
                    raise _ReadFailed(f"read at {offset} failed after {attempt} attempt(s): {last}") from last
                log.info("%s: read at %d failed (%r), retry %d in %.3fs", self.name, offset, last, attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, policy.retry_max_delay)
        except asyncio.CancelledError:
            if self._watchdog.unwatch(task):  # our deadline, not a caller's cancel
                task.uncancel()
                raise _ReadFailed(f"read at {offset} timed out after {policy.read_timeout}s ({attempt} attempt(s))") from None
            raise
        finally:
            if self._watchdog.unwatch(task):  # expired, but the image swallowed the cancel
                task.uncancel()

    async def _bounded_write(self, coro: Coroutine[Any, Any, Any]) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._watchdog.watch(task, loop.time() + self.policy.write_timeout, loop)
        try:
            await coro
        except ReadOnlyError:
            raise
        except asyncio.CancelledError:
            if self._watchdog.unwatch(task):
                task.uncancel()
                raise _WriteFailed(f"timed out after {self.policy.write_timeout}s") from None
            raise
        except (ObdError, OSError) as exc:
            raise _WriteFailed(str(exc) or type(exc).__name__) from exc
        finally:
            if self._watchdog.unwatch(task):  # expired, but the image swallowed the cancel
                task.uncancel()

    async def _write(self, rw: scsi.RwCommand, data: bytes) -> Response:
        await self._bounded_write(self.image.write(rw.lba * self.bs, data))
        if rw.fua:
            await self._bounded_write(self.image.flush())
        return GOOD

    async def _flush(self) -> Response:
        await self._bounded_write(self.image.flush())
        return GOOD

    async def _unmap(self, ranges: list[tuple[int, int]]) -> Response:
        for lba, blocks in ranges:
            await self._bounded_write(self.image.discard(lba * self.bs, blocks * self.bs))
        return GOOD

    def _verify(self, cdb: bytes, cmd: Command) -> Response | Coroutine[Any, Any, Response]:
        rw = scsi.decode_rw(cdb)
        scsi.check_range(rw.lba, rw.blocks, self.info.num_lbas)
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 0 or rw.blocks == 0:
            return GOOD  # medium verification: nothing to check beyond the range
        if bytchk != 1:
            raise CheckCondition(scsi.INVALID_FIELD_IN_CDB, f"BYTCHK={bytchk} not supported", field=1)
        want = rw.blocks * self.bs
        if cmd.data_length < want:
            raise CheckCondition(scsi.INVALID_FIELD_IN_CDB, "data-out shorter than verification length")
        expected = cmd.read_data_out(want)

        async def compare() -> Response:
            buf = bytearray(want)
            await self._read_with_retry(rw.lba * self.bs, buf)
            if buf != expected:
                first = next(i for i in range(want) if buf[i] != expected[i])
                return Response.check(
                    CheckCondition((scsi.SenseKey.MISCOMPARE, 0x1D, 0x00), "miscompare", info=first)
                )
            return GOOD

        return self._guard(rw.lba, compare)

    def _write_same(self, cdb: bytes, cmd: Command) -> Response | Coroutine[Any, Any, Response]:
        rw = scsi.decode_rw(cdb)
        if rw.anchor:
            raise CheckCondition(scsi.INVALID_FIELD_IN_CDB, "ANCHOR not supported", field=1)
        if rw.blocks == 0:  # WSNZ=1 in VPD B0
            raise CheckCondition(scsi.INVALID_FIELD_IN_CDB, "WRITE SAME of 0 blocks", field=10 if len(cdb) == 16 else 7)
        scsi.check_range(rw.lba, rw.blocks, self.info.num_lbas)
        self._check_writable()
        if rw.ndob:
            pattern = bytes(self.bs)
        else:
            if cmd.data_length < self.bs:
                raise CheckCondition(scsi.INVALID_FIELD_IN_CDB, "WRITE SAME without a data block")
            pattern = cmd.read_data_out(self.bs)
        if rw.unmap and not any(pattern):
            return self._guard(rw.lba, self._unmap, [(rw.lba, rw.blocks)])
        return self._guard(rw.lba, self._write_pattern, rw.lba, rw.blocks, pattern)

    async def _write_pattern(self, lba: int, blocks: int, pattern: bytes) -> Response:
        per_chunk = max(1, WRITE_SAME_CHUNK_BYTES // self.bs)
        chunk = pattern * min(per_chunk, blocks)
        done = 0
        while done < blocks:
            n = min(per_chunk, blocks - done)
            data = chunk if n * self.bs == len(chunk) else chunk[: n * self.bs]
            await self._bounded_write(self.image.write((lba + done) * self.bs, data))
            done += n
        return GOOD


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Awaitable that continues `coro`, already stepped once by hand and suspended on
    `pending` (what it yielded: the future it waits for), inside whatever task awaits this.
    The task waits on `pending`, then resumes coro; a cancel or throw at that point goes into
    coro at its suspension point, as if the task had run it from the start."""
    try:
        yield pending
    except BaseException as exc:
        try:
            pending = coro.throw(exc)
        except StopIteration as stop:
            return stop.value
        return (yield from _resume(coro, pending))
    return (yield from coro)


class _Watchdog:
    """Deadlines of a processor's in-flight image calls, checked by one periodic timer.

    A timer per command (asyncio.timeout) costs about a fifth of the frontend's CPU for a
    4 KiB read; here a command only puts its task in a dict. Every `tick` seconds (while
    something is watched) overdue tasks are cancelled and remembered as expired, so the
    command can tell its own deadline (→ MEDIUM ERROR) from a caller's cancel (shutdown →
    ABORTED COMMAND) and `uncancel()` the former. Deadlines fire up to one tick late.
    """

    def __init__(self, tick: float):
        self.tick = tick
        self._deadlines: dict[asyncio.Task, float] = {}
        self._expired: set[asyncio.Task] = set()
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, task: asyncio.Task, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        self._deadlines[task] = deadline
        if self._handle is None:
            self._handle = loop.call_later(self.tick, self._check, loop)

    def unwatch(self, task: asyncio.Task) -> bool:
        """Stop watching task. Returns True if its deadline had fired (it was cancelled for it)."""
        self._deadlines.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now = loop.time()
        for task, deadline in list(self._deadlines.items()):
            if now >= deadline:
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()
        if self._deadlines:
            self._handle = loop.call_later(self.tick, self._check, loop)


class _ReadFailed(Exception):
    pass


class _WriteFailed(Exception):
    pass


def _info(lba: int | None) -> int | None:
    return lba if lba is not None and 0 <= lba <= 0xFFFFFFFF else None
