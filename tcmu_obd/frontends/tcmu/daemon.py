"""`tcmu-obd run`: the TCMU daemon (drop-in for overlaybd-tcmu).

Lifecycle (serve = startup → main loop → shutdown)
-------------------------------------------------
startup:  check /sys/module/target_core_user → load overlaybd.json → raise RLIMIT_NOFILE →
          module params block_netlink=1, reset_netlink=1 → tcmulib_initialize (re-attaches
          devices that already exist: `added` runs for each) → block_netlink=0 → master
          netlink fd on the loop → signal handlers → ready.
main:     await the stop event. Netlink readable → tcmulib_master_fd_ready on the lane
          thread (device added/removed); uio readable → device.py.
shutdown: first SIGTERM/SIGINT: stop taking netlink events, refuse new devices, then
          tcmulib_close on the lane: for each device libtcmu blocks it in the kernel (no new
          commands), waits for its ring to drain — the loop keeps serving it meanwhile —
          then calls `removed`, which finishes in-flight commands, flushes the upper and
          closes the image. A second SIGINT forces: in-flight commands are cancelled
          (ABORTED COMMAND) at once.

Threads: libtcmu calls `added`/`removed` synchronously from inside tcmulib_initialize,
tcmulib_master_fd_ready and tcmulib_close. Those three run on a "lane" (one short-lived
daemon thread per call, serialized by a lock), never on the loop thread, so the callback
can block the lane until the loop has finished the async work (open the image / drain and
close it) — `added` returns only once the image is open or failed, keeping upstream's
contract: failure → −EPERM (the opener writes `failed:<msg>` to the resultFile) and the
kernel's configfs enable fails. Data-path calls stay on the loop thread.

Hooks: `opener(config_path, global_config, scheduler=...)` opens an image (default:
tcmu_obd.image.stack.open_image); `scheduler_factory(global_config)` (sync or async;
`tcmu-obd run` uses tcmu_obd.scheduler's Scheduler.create) builds, at the first open, the
one scheduler handed to every open (the opener starts upstream's background download when
download.enable is set); the scheduler is `aclose()`d at shutdown.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import resource
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import ObdError
from ...ops.audit import audit
from . import binding as _binding
from .commands import CommandProcessor, IoPolicy
from .device import TcmuDevice
from .scsi import BLOCK_SIZE, DeviceInfo

log = logging.getLogger(__name__)

KMOD_MISSING = "target_core_user kernel module is not loaded (modprobe target_core_user)"
SUBTYPE = "overlaybd"

Opener = Callable[..., Awaitable[Any]]


class TcmuUnavailable(ObdError):
    """The kernel side of TCMU is missing; the daemon cannot start."""


def parse_cfgstring(cfgstring: str) -> tuple[str, str | None]:
    """`overlaybd/<config path>[;<dev_id>]` → (config path, dev_id or None).

    Everything after the first "/" up to the first ";" is the config path (so the usual
    `overlaybd//var/lib/…/config.v1.json` gives an absolute path).
    Raises: ValueError when there is no "/" or the path is empty.
    """
    _, slash, rest = cfgstring.partition("/")
    if not slash:
        raise ValueError(f"cfgstring {cfgstring!r} has no '/': expected overlaybd/<config path>[;<dev_id>]")
    path, semi, dev_id = rest.partition(";")
    if not path:
        raise ValueError(f"cfgstring {cfgstring!r} names no config path")
    return path, (dev_id if semi and dev_id else None)


async def default_scheduler_factory(global_config: Any) -> Any:
    """The lead's scheduler (tcmu_obd.scheduler): owns the registry client and the cache."""
    from ...scheduler import Scheduler

    return await Scheduler.create(global_config)


async def default_opener(config_path: str, global_config: Any, *, scheduler: Any = None) -> Any:
    from ...image.stack import open_image  # the lead's image stack; imported when first needed

    return await open_image(config_path, global_config, scheduler=scheduler)


@dataclass(frozen=True)
class DaemonConfig:
    global_config_path: str | None = None
    io_policy: IoPolicy = field(default_factory=IoPolicy)
    drain_timeout: float = 30.0  # per device, on removal/shutdown, before cancelling commands
    open_timeout: float | None = None  # bound on opening an image in `added` (None: opener's own)
    sys_module_dir: str = "/sys/module/target_core_user"
    ready_file: str | None = None  # written (pid) once serving; for scripts and the VM rig


class Daemon:
    def __init__(
        self,
        config: DaemonConfig | None = None,
        *,
        opener: Opener | None = None,
        scheduler_factory: Callable[[Any], Any] | None = None,
        global_config: Any = None,
        binding: Any = _binding,
    ):
        self.config = config or DaemonConfig()
        self.opener = opener or default_opener
        self.scheduler_factory = scheduler_factory
        self.global_config = global_config
        self.scheduler: Any = None
        self.binding = binding
        self.devices: dict[int, TcmuDevice] = {}
        self._dev_ids: set[str] = set()
        self._ctx: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._force = False
        self._lane_lock: asyncio.Lock | None = None
        self._scheduler_lock = asyncio.Lock()
        self._master_fd: int | None = None
        self._netlink_busy = False
        self._signals: list[int] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(self, *, on_ready: Callable[["Daemon"], None] | None = None) -> int:
        """Run until stop. Returns the exit status (0). Raises: TcmuUnavailable/ObdError
        when startup fails (nothing is left registered then)."""
        try:
            await self.startup()
        except BaseException:
            await self.shutdown()
            raise
        try:
            if on_ready is not None:
                on_ready(self)
            await self._stop.wait()
        finally:
            await self.shutdown()
        return 0

    def check_kernel(self) -> None:
        if not _kmod_loaded(self.config.sys_module_dir):
            raise TcmuUnavailable(KMOD_MISSING)

    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._lane_lock = asyncio.Lock()
        self.check_kernel()
        self.binding.require_binding()
        self._install_signals()  # a signal during a long re-attach stops right after startup
        if self.global_config is None:
            from ...config import load_global_config

            self.global_config = load_global_config(self.config.global_config_path)
        _raise_nofile_limit()
        for name in ("block_netlink", "reset_netlink"):
            if not self.binding.set_module_param(name, 1):
                log.info("kernel has no target_core_user parameter %s (old kernel?)", name)
        try:
            self._ctx = await self._in_lane(self.binding.initialize, self)
        except _binding.TcmuError as exc:
            raise TcmuUnavailable(str(exc)) from exc
        finally:  # never leave the kernel's netlink blocked for the next handler
            self.binding.set_module_param("block_netlink", 0)
        self._master_fd = self._ctx.master_fd
        # tcmulib_master_fd_ready must never block the lane on a spurious wakeup
        os.set_blocking(self._master_fd, False)
        _tune_netlink(self._master_fd)
        self._loop.add_reader(self._master_fd, self._on_netlink_ready)
        if self.config.ready_file:
            with open(self.config.ready_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        self._started = True
        log.warning("tcmu-obd: serving TCMU handler %r (%d device(s) attached)", SUBTYPE, len(self.devices))

    def request_stop(self, force: bool = False) -> None:
        if force:
            self._force = True
            for dev in list(self.devices.values()):
                dev.abort_inflight()
        self._stop.set()

    async def shutdown(self) -> None:
        self._stopping = True
        self._remove_signals()
        if self._master_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._master_fd)
            self._master_fd = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await self._in_lane(ctx.close)  # → removed() for every device
        for key in list(self.devices):  # anything libtcmu did not hand back
            dev = self.devices.pop(key)
            await dev.aclose(0 if self._force else self.config.drain_timeout)
        self._dev_ids.clear()
        if self.scheduler is not None and hasattr(self.scheduler, "aclose"):
            try:
                await self.scheduler.aclose()
            except Exception:
                log.exception("closing the scheduler failed")
        if self.config.ready_file:
            try:
                os.unlink(self.config.ready_file)
            except FileNotFoundError:
                pass
        if self._started:
            log.warning("tcmu-obd: stopped")

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        assert self._loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._on_signal, sig)
            self._signals.append(sig)

    def _remove_signals(self) -> None:
        if self._loop is None:
            return
        for sig in self._signals:
            self._loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set():
            if sig == signal.SIGINT:
                log.warning("second SIGINT: aborting in-flight commands")
                self.request_stop(force=True)
            return
        log.warning("received %s: shutting down", signal.Signals(sig).name)
        self.request_stop()

    # -- lane: libtcmu control calls ----------------------------------------------------------

    async def _in_lane(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a libtcmu control call on its own daemon thread (serialized); see module doc."""
        assert self._loop is not None and self._lane_lock is not None
        loop = self._loop
        async with self._lane_lock:
            fut: asyncio.Future = loop.create_future()

            def run() -> None:
                try:
                    result = fn(*args)
                except BaseException as exc:
                    loop.call_soon_threadsafe(_set_exception, fut, exc)
                else:
                    loop.call_soon_threadsafe(_set_result, fut, result)

            threading.Thread(target=run, name="tcmu-obd-lane", daemon=True).start()
            return await asyncio.shield(fut)

    def _on_netlink_ready(self) -> None:
        if self._netlink_busy or self._ctx is None or self._stopping:
            return
        self._netlink_busy = True
        assert self._loop is not None and self._master_fd is not None
        self._loop.remove_reader(self._master_fd)  # level-triggered: off while the lane reads
        self._loop.create_task(self._process_netlink())

    async def _process_netlink(self) -> None:
        try:
            if self._ctx is not None:
                await self._in_lane(self._ctx.master_fd_ready)
        except Exception:
            log.exception("processing netlink events failed")
        finally:
            self._netlink_busy = False
            if self._master_fd is not None and not self._stopping and self._loop is not None:
                self._loop.add_reader(self._master_fd, self._on_netlink_ready)

    # -- libtcmu callbacks (lane thread) --------------------------------------------------------

    def on_added(self, dev: Any) -> int:
        return self._call_on_loop(self.attach(dev), -errno.EPERM)

    def on_removed(self, dev: Any) -> None:
        self._call_on_loop(self.detach(dev), None)

    def _call_on_loop(self, coro: Any, on_error: Any) -> Any:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            coro.close()  # would deadlock: libtcmu control calls must come from the lane
            log.error("libtcmu callback on the event-loop thread; refusing")
            return on_error
        try:
            return asyncio.run_coroutine_threadsafe(coro, loop).result()
        except Exception:
            log.exception("device callback failed")
            return on_error

    # -- devices (event-loop thread) ------------------------------------------------------------

    async def attach(self, dev: Any) -> int:
        """Open the image named by dev's cfgstring and start serving it.
        Returns 0, or −EPERM (upstream's dev_open contract) on any failure."""
        cfgstring = dev.cfgstring
        name = _short_name(dev, cfgstring)
        if self._stopping:
            log.error("%s: refusing new device while shutting down", name)
            return -errno.EPERM
        try:
            config_path, dev_id = parse_cfgstring(cfgstring)
        except ValueError as exc:
            log.error("%s: %s", name, exc)
            return -errno.EPERM
        if dev_id is not None and dev_id in self._dev_ids:
            log.error("%s: dev_id %r is already in use", name, dev_id)
            self._report_failure(config_path, f"dev_id {dev_id} is already in use")
            return -errno.EPERM
        if dev_id is not None:
            self._dev_ids.add(dev_id)  # reserve while opening
        try:
            image = await self._open(config_path)
        except _OpenTimeout:  # the opener was cancelled before it could say so
            if dev_id is not None:
                self._dev_ids.discard(dev_id)
            log.error("%s: opening %s timed out after %ss", name, config_path, self.config.open_timeout)
            self._report_failure(config_path, f"open timed out after {self.config.open_timeout}s")
            return -errno.EPERM
        except Exception as exc:
            if dev_id is not None:
                self._dev_ids.discard(dev_id)
            log.error("%s: cannot open image %s: %s", name, config_path, exc)
            return -errno.EPERM
        try:
            num_lbas = image.size // BLOCK_SIZE
            dev.configure(block_size=BLOCK_SIZE, num_lbas=num_lbas, unmap=True, write_cache=False)
            info = DeviceInfo(
                num_lbas=num_lbas,
                block_size=BLOCK_SIZE,
                read_only=bool(image.read_only),
                cfgstring=cfgstring,
            )
            # the unit serial is read from configfs when an initiator asks (VPD 0x80/0x83),
            # not here: configfs may not have it yet while the kernel waits for `added`
            processor = CommandProcessor(image, info, self.config.io_policy, name=name, wwn_source=dev.wwn)
            device = TcmuDevice(dev, processor, name=name, dev_id=dev_id, loop=self._loop)
            self.devices[dev.key] = device
            device.start()
        except Exception:
            log.exception("%s: cannot start serving", name)
            self.devices.pop(dev.key, None)
            if dev_id is not None:
                self._dev_ids.discard(dev_id)
            try:
                await image.aclose()
            except Exception:
                log.exception("%s: closing the image failed", name)
            return -errno.EPERM
        log.warning(
            "%s: attached %s (%d bytes, %s)", name, config_path, image.size, "read-only" if info.read_only else "read-write"
        )
        audit("open", device=name, config=config_path, size=image.size, read_only=info.read_only, dev_id=dev_id or "")
        return 0

    def _report_failure(self, config_path: str, message: str) -> None:
        """Write `failed:<message>` to the image's resultFile for failures the opener never
        saw (it reports its own). Best effort: an unreadable config has no resultFile."""
        try:
            from ...config import load_image_config, write_result_file

            write_result_file(load_image_config(config_path, self.global_config), message)
        except Exception as exc:
            log.info("cannot write resultFile for %s: %s", config_path, exc)

    async def _get_scheduler(self) -> Any:
        """The shared scheduler, built on first use (not at startup: it costs imports, a
        cache directory and an HTTP session that local-only images never need). A factory
        failure is logged and retried at the next open; images with only local layers
        open without it."""
        if self.scheduler is None and self.scheduler_factory is not None:
            async with self._scheduler_lock:
                if self.scheduler is None:
                    try:
                        sched = self.scheduler_factory(self.global_config)
                        if inspect.isawaitable(sched):
                            sched = await sched
                        self.scheduler = sched
                    except Exception as exc:
                        log.warning("no scheduler, remote layers cannot be opened: %s", exc)
        return self.scheduler

    async def _open(self, config_path: str) -> Any:
        scheduler = await self._get_scheduler()
        coro = self.opener(config_path, self.global_config, scheduler=scheduler)
        if self.config.open_timeout is None:
            return await coro
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=self.config.open_timeout)
        if not done:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is None:
                await _close_quietly(task.result())  # finished while being cancelled
            raise _OpenTimeout()
        return task.result()

    async def detach(self, dev: Any) -> None:
        """Finish the device's commands, flush and close its image (libtcmu frees dev after)."""
        device = self.devices.pop(dev.key, None)
        if device is None:
            return
        await device.aclose(0 if self._force else self.config.drain_timeout)
        if device.dev_id is not None:
            self._dev_ids.discard(device.dev_id)
        log.warning("%s: detached", device.name)
        audit("close", device=device.name, dev_id=device.dev_id or "")


class _OpenTimeout(Exception):
    pass


async def _close_quietly(image: Any) -> None:
    try:
        await image.aclose()
    except Exception:
        log.exception("closing an image opened too late failed")


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _short_name(dev: Any, cfgstring: str) -> str:
    try:
        return dev.uio_name or cfgstring
    except Exception:
        return cfgstring


NETLINK_RCVBUF_BYTES = 4 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SOL_NETLINK = getattr(socket, "SOL_NETLINK", 270)
_NETLINK_NO_ENOBUFS = 5


def _tune_netlink(fd: int) -> bool:
    """As upstream: a 4 MiB receive buffer (SO_RCVBUFFORCE, needs CAP_NET_ADMIN) and
    NETLINK_NO_ENOBUFS, so a burst of device add/remove events is not dropped. Best effort."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        log.info("cannot tune the netlink socket: %s", exc)
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, NETLINK_RCVBUF_BYTES)
        sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
        return True
    except OSError as exc:
        log.info("cannot tune the netlink socket: %s", exc)
        return False
    finally:
        sock.close()  # closes the dup only


def _kmod_loaded(sys_module_dir: str) -> bool:
    return os.path.isdir(sys_module_dir)


def _raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
