"""One TCMU device on the event loop: uio fd → commands → image → completions.

Theory of operation
-------------------
`start()` puts the device's uio fd on the loop. When it is readable, `_on_ring_ready`
acknowledges the event (tcmulib_processing_start), then drains every queued command
(tcmulib_get_next_command) and hands each to the CommandProcessor: emulated commands
complete immediately, image commands become tasks. Each completion writes the response to
the ring (tcmulib_command_complete); the kernel is poked (tcmulib_processing_complete)
once per batch: once at the end of a ring drain for the commands answered in it, at once
for a lone in-flight command (QD1 latency), else once per loop iteration however many
commands completed in it (`_schedule_notify`). Over the real binding the reader is
`_drain_batched` instead: the same drain a batch of commands per C call, with READs whose
bytes are at hand answered in place (see there).

States: RUNNING → CLOSING (no more ring reads; in-flight commands finish, then are
cancelled after the grace period and answered ABORTED COMMAND) → CLOSED (image flushed and
closed; the handle must not be touched any more: libtcmu frees it when `removed` returns).

Isolation: nothing a command does can raise out of here; an exception from the image
becomes that command's CHECK CONDITION (commands.py), and a failure while completing is
logged and the device carries on.

`handle` is a binding.Device or anything with the same small surface (fd, processing_start,
next_command, complete_good, complete, processing_complete), which is how the unit tests drive it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

from ...ops.counters import SCSI_COMMANDS
from . import scsi
from .commands import CommandProcessor, Response
from .scsi import CheckCondition, ScsiStatus

log = logging.getLogger(__name__)


def _aborted() -> Response:
    return Response.check(CheckCondition(scsi.COMMAND_ABORTED, "device closing"))


class DeviceState(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class TcmuDevice:
    def __init__(
        self,
        handle: Any,
        processor: CommandProcessor,
        *,
        name: str,
        dev_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.handle = handle
        self.processor = processor
        self.image = processor.image
        self.name = name
        self.dev_id = dev_id
        self.state = DeviceState.RUNNING
        self._loop = loop or asyncio.get_running_loop()
        self._inflight: dict[asyncio.Task, tuple[Any, Any]] = {}  # task → (command, its coroutine)
        self._notify_pending = False
        self._in_batch = False
        self._batch_completed = False
        self._reading = False
        self.completed = 0  # commands completed (stats / tests)
        # batched drain with in-place reads when the handle offers it (binding.Device does;
        # the unit tests' fake handles drain one command at a time)
        self._ring = None
        if hasattr(handle, "ring"):
            try:
                self._ring = handle.ring()
            except Exception as exc:  # serve anyway, one command at a time
                log.warning("%s: batched ring drain unavailable (%s); draining one command at a time", name, exc)
        bs = processor.bs
        self._block_shift = bs.bit_length() - 1
        if bs & (bs - 1):
            self._ring = None  # the in-place path needs a power-of-two block size
        # the READ fast path of the batched drain: the image's synchronous read, if it has one
        self._read_nowait = processor.read_nowait
        # tcmulib_processing_complete: the ring's bound C call when there is one
        self._kick = self._ring.notify if self._ring is not None else handle.processing_complete

    def __repr__(self) -> str:
        return f"<TcmuDevice {self.name} {self.state.value} inflight={len(self._inflight)}>"

    # -- ring ----------------------------------------------------------------------------------

    def start(self) -> None:
        on_ready = self._drain_batched if self._ring is not None else self._on_ring_ready
        self._loop.add_reader(self.handle.fd, on_ready)
        self._reading = True
        # commands may already be queued (re-attach after a restart): look once now
        self._loop.call_soon(on_ready)

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.handle.fd)
            self._reading = False

    def _on_ring_ready(self) -> None:
        if self.state is not DeviceState.RUNNING:
            return
        self._in_batch = True
        self._batch_completed = False
        try:
            self.handle.processing_start()
            while (cmd := self.handle.next_command()) is not None:
                self._dispatch(cmd)
        except Exception:
            log.exception("%s: error draining the command ring", self.name)
        finally:
            self._in_batch = False
        if self._batch_completed and not self._notify_pending:
            self._notify()  # one kernel wakeup for everything answered in this batch

    def _drain_batched(self) -> None:
        """_on_ring_ready over binding.Device's batched drain (`ring`, a RingOps): commands
        come off the ring a batch per C call, and a READ whose bytes are at hand is answered
        right into its data buffer, with no command object, data copy, Response or coroutine.
        Everything else goes through _dispatch like the one-at-a-time drain.

        Under emulation (the VM rig) the interpreter's work per command is what separates a
        Python handler from a C one, so this loop is written flat: a cached 4 KiB READ costs
        a few bytecodes here plus the image's synchronous read."""
        if self.state is not DeviceState.RUNNING:
            return
        ring, nowait = self._ring, self._read_nowait
        info, area, skip, batch = ring.info, ring.area, ring.NOT_IN_PLACE, ring.batch
        num_lbas, shift = self.processor.info.num_lbas, self._block_shift
        read10 = read16 = 0  # READ(10)/(16) answered in place
        self._in_batch = True
        self._batch_completed = False
        try:
            n = ring.start(num_lbas, shift)
            while True:
                for i in range(n):
                    j = 4 * i
                    offset = info[j]
                    if offset != skip and nowait is not None:
                        length = info[j + 1]
                        at = info[j + 2]
                        try:
                            done = nowait(offset, area[at:at + length])
                        except Exception:
                            done = False  # _dispatch reads again and maps the error
                        if done:
                            ring.complete_in_place(i, length)
                            if info[j + 3] == 0x28:
                                read10 += 1
                            else:
                                read16 += 1
                            continue
                    self._dispatch(ring.adopt(i))
                if n < batch:
                    break
                n = ring.more(num_lbas, shift)
        except Exception:
            log.exception("%s: error draining the command ring", self.name)
        finally:
            self._in_batch = False
            if read10:
                self._count_in_place(0x28, read10)
            if read16:
                self._count_in_place(0x88, read16)
        if self._batch_completed and not self._notify_pending:
            self._notify()  # one kernel wakeup for everything answered in this batch

    def _count_in_place(self, opcode: int, n: int) -> None:
        SCSI_COMMANDS.add(self.name, opcode, ScsiStatus.GOOD, n)
        self.completed += n
        self._batch_completed = True

    def _dispatch(self, cmd: Any) -> None:
        r = self.processor.submit(cmd)
        if isinstance(r, Response):
            self._complete(cmd, r)
            return
        task = self._loop.create_task(self._run(cmd, r))
        self._inflight[task] = (cmd, r)
        task.add_done_callback(self._task_done)

    async def _run(self, cmd: Any, coro: Any) -> None:
        try:
            resp = await coro
        except asyncio.CancelledError:
            self._finish(cmd, _aborted())
            raise
        except BaseException as exc:  # commands.py maps errors; this is a last resort
            log.exception("%s: command failed", self.name)
            resp = Response.check(CheckCondition(scsi.INTERNAL_TARGET_FAILURE, repr(exc)))
        self._finish(cmd, resp)

    def _finish(self, cmd: Any, resp: Response) -> None:
        """Complete from inside the command's own task (no extra loop turn)."""
        self._inflight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        self._complete(cmd, resp)

    def _task_done(self, task: asyncio.Task) -> None:
        entry = self._inflight.pop(task, None)
        if entry is None:
            return  # _run answered it
        # cancelled before its first step (an abort right after dispatch): _run never ran
        cmd, coro = entry
        coro.close()
        self._complete(cmd, _aborted())

    def _complete(self, cmd: Any, resp: Response) -> None:
        if self.state is DeviceState.CLOSED:
            log.error("%s: dropping completion of a command after close", self.name)
            return
        try:
            if resp.status == ScsiStatus.GOOD:
                self.handle.complete_good(cmd, resp.data)
            else:
                self.handle.complete(cmd, resp.status, resp.sense)
        except Exception:
            log.exception("%s: error completing a command", self.name)
            return
        self.completed += 1
        SCSI_COMMANDS.record(self.name, cmd.cdb[0], resp.status)  # metrics: by opcode and status
        if self._in_batch:
            self._batch_completed = True  # _on_ring_ready notifies once at its end
        elif not self._inflight and not self._notify_pending:
            self._notify()  # the only command in flight: nothing to coalesce with, wake now
        else:
            self._schedule_notify()

    def _schedule_notify(self) -> None:
        """Coalesce: one tcmulib_processing_complete per loop iteration, however many
        commands completed in it."""
        if not self._notify_pending:
            self._notify_pending = True
            self._loop.call_soon(self._notify_soon)

    def _notify_soon(self) -> None:
        self._notify_pending = False
        self._notify()

    def _notify(self) -> None:
        if self.state is DeviceState.CLOSED:
            return
        try:
            self._kick()
        except Exception:
            log.exception("%s: error notifying the kernel", self.name)

    # -- shutdown ------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def abort_inflight(self) -> int:
        """Cancel every running command (each is answered ABORTED COMMAND). Returns how many."""
        tasks = list(self._inflight)
        for t in tasks:
            t.cancel()
        return len(tasks)

    async def drain(self, grace: float) -> None:
        """Stop reading the ring; let in-flight commands finish for up to `grace` seconds,
        then cancel the rest (each answered ABORTED COMMAND)."""
        if self.state is DeviceState.RUNNING:
            self.state = DeviceState.CLOSING
        self._stop_reading()
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("%s: cancelled %d command(s) still running after %.1fs", self.name, len(pending), grace)
                await asyncio.wait(pending)
        if self._notify_pending:  # don't leave the last completions unannounced
            self._notify_pending = False
            self._notify()

    async def aclose(self, grace: float = 30.0) -> None:
        """drain(), then flush (unless read-only) and close the image. Idempotent."""
        if self.state is DeviceState.CLOSED:
            return
        await self.drain(grace)
        self.state = DeviceState.CLOSED
        try:
            if not self.image.read_only:
                await self.image.flush()
        except Exception:
            log.exception("%s: flush on close failed", self.name)
        try:
            await self.image.aclose()
        except Exception:
            log.exception("%s: closing the image failed", self.name)
