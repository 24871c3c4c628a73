"""`tcmu-obd serve`: export an overlaybd image (or a raw file) over NBD.

    tcmu-obd serve [--global-config G] CONFIG --nbd unix:PATH|tcp:HOST:PORT
                   [--read-only] [--export-name NAME]
    tcmu-obd serve --raw FILE --nbd ...            (the frontend alone, for benchmarks)

Lifecycle: open the image -> listen -> print one "listening on <uri>" line on stdout
(scripts wait for it; under systemd READY=1 goes to $NOTIFY_SOCKET) -> serve until
SIGINT/SIGTERM (STOPPING=1) -> stop listening, let in-flight requests finish, flush the
image, close it.  A second signal forces the shutdown.
Exit codes: 0 clean shutdown, 1 error while serving, 3 startup failed (nothing served).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass

from ..errors import ImageIOError, ObdError, ReadOnlyError
from ..image.base import Extent
from ..ops import sdnotify
from ..ops.audit import audit
from ..ops.control_socket import add_arguments
from ..ops.observability import ServiceOps

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STARTUP_FAILURE = 3
SHUTDOWN_GRACE = 30.0


@dataclass(frozen=True)
class Listen:
    """Where to listen: kind "unix" (path) or "tcp" (host, port)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> "Listen":
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ValueError("unix: needs a socket path")
            return cls("unix", path=path)
        if text.startswith("tcp:"):
            host, sep, port = text[4:].rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"bad tcp address {text!r} (tcp:HOST:PORT)")
            return cls("tcp", host=host.strip("[]") or "localhost", port=int(port))
        raise ValueError(f"bad --nbd address {text!r}: use unix:PATH or tcp:HOST:PORT")


def nbd_uri(listen: Listen, export_name: str, port: int | None = None) -> str:
    """The NBD URI clients (qemu, nbdinfo, nbdcopy) take for this address."""
    if listen.kind == "unix":
        return f"nbd+unix:///{export_name}?socket={listen.path}"
    host = listen.host
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{port if port is not None else listen.port}/{export_name}"


class RawFileImage:
    """A plain raw file as a BlockImage (the `--raw` escape hatch; also used by tests).

    Small reads and all writes are synchronous pread/pwrite on the event loop thread (right
    for the page-cache-warm benchmarking this exists for, wrong for a slow disk); reads of
    THREAD_READ_MIN bytes or more run in the default executor, so their copy overlaps the
    loop's socket writes on another core (preadv releases the GIL).  Past EOF reads as
    zeroes; extents come from SEEK_DATA/SEEK_HOLE.
    """

    block_size = 512
    THREAD_READ_MIN = 4 * 1024 * 1024

    def __init__(self, path: str, *, read_only: bool = True):
        self.path = path
        self.read_only = read_only
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self._fd).st_size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageIOError(f"range [{offset}, {offset + length}) outside {self.size} bytes", 22)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        if len(buf) >= self.THREAD_READ_MIN:
            await asyncio.get_running_loop().run_in_executor(None, self._pread_all, offset, buf)
        else:
            self._pread_all(offset, buf)

    def _pread_all(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError()
        self._check(offset, len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError()
        self._check(offset, length)
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = os.pwrite(self._fd, zeros[: end - offset], offset)
            offset += n

    async def flush(self) -> None:
        if not self.read_only:
            await asyncio.to_thread(os.fsync, self._fd)

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = offset + length
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    data = end
                data = min(data, end)
                if data > pos:
                    out.append(Extent(pos, data - pos, "hole"))
                if data >= end:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
                out.append(Extent(data, hole - data, "data"))
                pos = hole
        except OSError:
            return [Extent(offset, length, "data")]
        return out

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "serve",
        help="export an image over NBD",
        description="Serve an overlaybd image (config.v1.json) or a raw file over NBD.",
    )
    sp.add_argument("config", nargs="?", metavar="CONFIG", help="image config.v1.json")
    sp.add_argument("--global-config", metavar="G", help="overlaybd.json (default: the usual path)")
    sp.add_argument("--raw", metavar="FILE", help="serve a plain raw file instead of CONFIG")
    sp.add_argument("--nbd", required=True, metavar="ADDR", help="unix:PATH or tcp:HOST:PORT")
    sp.add_argument("--read-only", action="store_true", help="refuse writes")
    sp.add_argument("--export-name", default="", metavar="NAME", help='export name (default "")')
    sp.add_argument("--description", default=None, help="export description shown to clients")
    add_arguments(sp)  # --control-socket (tcmu-obd status); exporterConfig and logs come from G
    sp.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    try:
        listen = Listen.parse(args.nbd)
    except ValueError as e:
        print(f"tcmu-obd serve: error: {e}", file=sys.stderr)
        return EXIT_STARTUP_FAILURE
    if bool(args.config) == bool(args.raw):
        print("tcmu-obd serve: error: give exactly one of CONFIG or --raw FILE", file=sys.stderr)
        return EXIT_STARTUP_FAILURE
    return asyncio.run(_serve(args, listen))


async def _open(args: argparse.Namespace, stack: contextlib.AsyncExitStack):
    """Open what to serve; everything opened is closed by `stack` (image, then scheduler)."""
    if args.raw:
        image = RawFileImage(args.raw, read_only=args.read_only)
        stack.push_async_callback(image.aclose)
        return image
    from ..config import load_global_config
    from .runtime import opened_image

    global_config = load_global_config(args.global_config)
    return await stack.enter_async_context(opened_image(args.config, global_config, read_only=args.read_only))


async def _serve(args: argparse.Namespace, listen: Listen) -> int:
    from ..frontends.nbd.server import NBDServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("signal %d: %s", signum, "shutting down" if signals_seen == 1 else "forcing shutdown")
        if signals_seen == 1:
            sdnotify.stopping()
        stop.set()

    # -- startup: any failure here exits 3 ------------------------------------------
    image = None
    server = None
    resources = contextlib.AsyncExitStack()
    served = args.config or args.raw
    try:
        from ..config import load_global_config

        ops = ServiceOps("serve", load_global_config(args.global_config), args.control_socket)
        resources.push_async_callback(ops.aclose)  # closed last: logs outlive the image
        image = await _open(args, resources)
        desc = args.description or (f"raw file {args.raw}" if args.raw else f"overlaybd {args.config}")
        server = NBDServer(image, export_name=args.export_name, read_only=args.read_only, description=desc)
        if listen.kind == "unix":
            await server.serve_unix(listen.path)
            port = None
        else:
            srv = await server.serve_tcp(listen.host, listen.port)
            port = srv.sockets[0].getsockname()[1]
        uri = nbd_uri(listen, args.export_name, port)
        await ops.start(images=lambda: [(served, image)], info={"config": served, "nbd": uri})
        audit("open", device=uri, config=served, size=image.size, read_only=server.read_only)
    except (ObdError, OSError, ImportError, ValueError) as e:
        print(f"tcmu-obd serve: startup failed: {e}", file=sys.stderr)
        sdnotify.status(f"startup failed: {e}")
        if server is not None:
            await server.aclose(grace=0)
        await resources.aclose()
        return EXIT_STARTUP_FAILURE

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    ro = " read-only" if server.read_only else ""
    print(f"tcmu-obd serve: listening on {nbd_uri(listen, args.export_name, port)} "
          f"size={image.size}{ro}", flush=True)
    sdnotify.ready(f"serving {nbd_uri(listen, args.export_name, port)}")

    # -- serve until a signal, then drain ------------------------------------------
    code = EXIT_OK
    try:
        await stop.wait()
        stop.clear()
        closing = asyncio.ensure_future(server.aclose(grace=SHUTDOWN_GRACE))
        forced = asyncio.ensure_future(stop.wait())  # a second signal
        done, _ = await asyncio.wait({closing, forced}, return_when=asyncio.FIRST_COMPLETED)
        if closing not in done:
            closing.cancel()
            await server.aclose(grace=0)
        forced.cancel()
        if closing.done() and not closing.cancelled() and closing.exception() is not None:
            raise closing.exception()  # type: ignore[misc]
        if not server.read_only:
            await image.flush()
    except (ObdError, OSError) as e:
        print(f"tcmu-obd serve: error: {e}", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        audit("close", device=uri, config=served)
        await resources.aclose()
    print("tcmu-obd serve: stopped", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run `serve` alone (python -m tcmu_obd.tools.serve ...), without the other tools."""
    parser = argparse.ArgumentParser(prog="tcmu-obd")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
