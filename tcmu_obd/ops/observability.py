"""Observability for one long-running command (run, serve, fetch), on its event loop.

    async with Observability(global_config, command="serve", images=lambda: [(name, image)]):
        ...serve...

Starts, as configured:
* the Prometheus exporter (overlaybd.json `exporterConfig`: enable, port, uriPrefix), an
  aiohttp server on the daemon's own loop, so a scrape reads the counters on the thread that
  writes them (no locks, no torn dict iteration) and never blocks it for more than one
  collection;
* the control socket: HTTP on a unix socket (`GET /status`: the same samples as JSON, plus
  what the process is; `GET /metrics`: the exposition text), read by `tcmu-obd status`.
  Default path DEFAULT_DIR/<command>-<pid>.sock (several commands can run at once; `status`
  without --socket asks every socket there). A default path that cannot be created is
  skipped with a warning; an explicit one is a startup error;
* the throughput sampler (one tick a second, ops.metrics.Meters).

Logging (ops.logs) is set up by the command before the loop starts, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Callable

from ..errors import ObdError
from .control_socket import DEFAULT_DIR
from .metrics import Meters, ObdCollector, snapshot

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 1.0


def default_socket_path(command: str, run_dir: str | None = None) -> str:
    return os.path.join(run_dir or os.environ.get("TCMU_OBD_CONTROL_DIR") or DEFAULT_DIR, f"{command}-{os.getpid()}.sock")


def socket_pid(path: str) -> int | None:
    """The pid in a default socket name (<command>-<pid>.sock), else None."""
    stem = os.path.basename(path).rsplit(".sock", 1)[0]
    tail = stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_stale(run_dir: str) -> list[str]:
    """Remove default-named sockets whose process is gone (a SIGKILLed command leaves its
    socket behind). Returns the paths removed."""
    removed = []
    try:
        names = os.listdir(run_dir)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(run_dir, name)
        pid = socket_pid(path) if name.endswith(".sock") else None
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Observability:
    """Exporter + control socket + sampler for one process. `control_socket`: a path, None
    for the default path, or "none" to run without one."""

    def __init__(self, global_config, *, command: str, control_socket: str | None = None,
                 images: Callable[[], list] = lambda: [], info: dict | None = None):
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.gc = global_config
        self.command = command
        self.explicit_socket = control_socket not in (None, "")
        self.socket_path = "" if control_socket == "none" else (control_socket or default_socket_path(command))
        self.info = dict(info or {})
        self.meters = Meters()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ObdCollector(images=images, meters=self.meters))
        ProcessCollector(registry=self.registry)
        self.metrics_url = ""
        self.metrics_port: int | None = None
        self.sample_interval = SAMPLE_INTERVAL
        self.started_at = time.time()
        self._runners: list = []
        self._sampler: asyncio.Task | None = None
        self._owned_socket = ""

    # --- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> "Observability":
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def start(self) -> None:
        ec = self.gc.exporter_config
        if ec.enable:
            await self._start_exporter(ec.port, ec.uri_prefix)
        if self.socket_path:
            await self._start_control()
        self.meters.sample(time.monotonic())
        self._sampler = asyncio.get_running_loop().create_task(self._sample_loop(), name="metrics-sampler")

    async def aclose(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._owned_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._owned_socket)
            self._owned_socket = ""

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval)
            try:
                self.meters.sample(time.monotonic())
            except Exception:  # a metrics bug must never take the service down
                log.exception("sampling throughput failed")

    # --- HTTP ----------------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def status(self) -> dict:
        return {
            "command": self.command,
            "pid": os.getpid(),
            "started": self.started_at,
            "uptime": time.time() - self.started_at,
            "metrics_url": self.metrics_url,
            "socket": self.socket_path,
            **self.info,
            "samples": snapshot(self.registry),
        }

    async def _metrics(self, request):
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            body = self.exposition()
        except Exception as e:
            log.exception("collecting metrics failed")
            return web.Response(status=500, text=f"collecting metrics failed: {e}\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request):
        from aiohttp import web

        return web.json_response(self.status())

    async def _start_exporter(self, port: int, prefix: str) -> None:
        from aiohttp import web

        if not prefix.startswith("/"):
            prefix = "/" + prefix
        if not 0 <= port <= 65535:
            raise ObdError(f"exporterConfig.port {port} is not a TCP port")
        app = web.Application()
        app.router.add_get(prefix, self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        # every interface; port 0 (tests) picks a free port, which is only one port on one
        # address family, so then IPv4 alone
        site = web.TCPSite(runner, host="0.0.0.0" if port == 0 else None, port=port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise ObdError(f"exporterConfig: cannot listen on port {port}: {e.strerror or e}") from e
        bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
        self.metrics_url = f"http://{socket.gethostname()}:{bound}{prefix}"
        self.metrics_port = bound
        log.warning("metrics: serving Prometheus metrics on port %d at %s", bound, prefix)

    async def _start_control(self) -> None:
        from aiohttp import web

        path = self.socket_path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
            if not self.explicit_socket:
                prune_stale(os.path.dirname(path))
            if os.path.exists(path):
                if _socket_alive(path):
                    raise ObdError(f"control socket {path}: another process is serving it")
                os.unlink(path)  # stale: its process is gone
        except OSError as e:
            return self._control_failed(f"control socket {path}: {e.strerror or e}")
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.UnixSite(runner, path)
        try:
            await site.start()
        except OSError as e:
            return self._control_failed(f"control socket {path}: {e.strerror or e}")
        self._owned_socket = path
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)  # the numbers are not secret, but the socket is root's business
        log.info("control socket: %s", path)

    def _control_failed(self, message: str) -> None:
        if self.explicit_socket:
            raise ObdError(message)
        log.warning("%s; running without it (`tcmu-obd status` cannot reach this process)", message)
        self.socket_path = ""


class ServiceOps:
    """What a long-running command does for observability: log files and audit log from the
    global config (now), then exporter, control socket and sampler (`start`, on the loop).

        ops = ServiceOps("serve", global_config, args.control_socket)
        await ops.start(images=lambda: [(name, image)], info={...})
        ...
        await ops.aclose()
    """

    def __init__(self, command: str, global_config, control_socket: str | None = None):
        import sys

        from .logs import configure

        self.command = command
        self.gc = global_config
        self.control_socket = control_socket
        self.logs = configure(global_config, upstream_defaults=(command == "run"))
        for err in self.logs.errors:
            print(f"tcmu-obd {command}: warning: {err}; not writing it", file=sys.stderr, flush=True)
        self.obs: Observability | None = None

    async def start(self, *, images: Callable[[], list] = lambda: [], info: dict | None = None) -> Observability:
        info = dict(info or {})
        if self.logs.plan.log_path:
            info.setdefault("log_file", self.logs.plan.log_path)
        if self.logs.plan.audit_path:
            info.setdefault("audit_file", self.logs.plan.audit_path)
        obs = Observability(self.gc, command=self.command, control_socket=self.control_socket,
                            images=images, info=info)
        await obs.__aenter__()
        self.obs = obs
        return obs

    async def aclose(self) -> None:
        if self.obs is not None:
            await self.obs.aclose()
            self.obs = None
        self.logs.close()
