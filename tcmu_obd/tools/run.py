"""`tcmu-obd run`: the TCMU daemon, drop-in for upstream's overlaybd-tcmu.

    tcmu-obd run [--global-config PATH] [--ready-file PATH] [--read-timeout S]
                 [--drain-timeout S] [--open-timeout S]

Serves every TCMU device whose configfs control string is `dev_config=overlaybd/<config
path>[;<dev_id>]` (see docs/tcmu.md). Prints one "tcmu-obd run: ready" line on stderr once
serving (and writes --ready-file with the pid; under systemd, sends READY=1 to
$NOTIFY_SOCKET). SIGTERM/SIGINT: drain and exit; a second SIGINT aborts in-flight commands.
Exit codes: 0 clean shutdown, 1 error while serving, 3 startup failed (e.g. the
target_core_user kernel module is not loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..errors import ObdError
from ..ops import sdnotify
from ..ops.control_socket import add_arguments
from ..ops.observability import ServiceOps

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STARTUP_FAILURE = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the TCMU daemon (serves overlaybd/<config> TCMU devices)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--global-config",
        metavar="PATH",
        default=None,
        help="overlaybd.json (default /etc/overlaybd/overlaybd.json when present, else built-in defaults)",
    )
    p.add_argument("--ready-file", metavar="PATH", default=None, help="write the pid here once serving")
    p.add_argument(
        "--read-timeout",
        metavar="S",
        type=float,
        default=20.0,
        help="budget for a READ, retries included, before MEDIUM ERROR (default 20)",
    )
    p.add_argument(
        "--write-timeout", metavar="S", type=float, default=20.0, help="bound on one write/flush/discard (default 20)"
    )
    p.add_argument(
        "--drain-timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="on removal/shutdown, wait this long for in-flight commands before aborting them (default 30)",
    )
    p.add_argument(
        "--open-timeout", metavar="S", type=float, default=None, help="bound on opening an image (default: none)"
    )
    add_arguments(p)  # --control-socket (tcmu-obd status); exporterConfig, logConfig, audit come from the config
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..frontends.tcmu.commands import IoPolicy
    from ..frontends.tcmu.daemon import Daemon, DaemonConfig, default_scheduler_factory

    for opt in ("read_timeout", "write_timeout", "drain_timeout"):
        if getattr(args, opt) <= 0:
            print(f"tcmu-obd run: error: --{opt.replace('_', '-')} must be > 0", file=sys.stderr)
            return EXIT_STARTUP_FAILURE
    config = DaemonConfig(
        global_config_path=args.global_config,
        io_policy=IoPolicy(read_timeout=args.read_timeout, write_timeout=args.write_timeout),
        drain_timeout=args.drain_timeout,
        open_timeout=args.open_timeout,
        ready_file=args.ready_file,
    )
    daemon = Daemon(config, scheduler_factory=default_scheduler_factory)
    started = False

    def on_ready(d: Daemon) -> None:
        nonlocal started
        started = True
        print(f"tcmu-obd run: ready ({len(d.devices)} device(s) attached)", file=sys.stderr, flush=True)
        sdnotify.ready(f"serving {len(d.devices)} device(s)")  # Type=notify units start here

    async def serve_observed() -> int:
        from ..config import load_global_config

        # loaded here so logging, the exporter and the daemon all see the same file
        daemon.global_config = load_global_config(args.global_config)
        ops = ServiceOps("run", daemon.global_config, args.control_socket)
        try:
            await ops.start(images=lambda: [(d.name, d.image) for d in list(daemon.devices.values())])
            return await daemon.serve(on_ready=on_ready)
        finally:
            await ops.aclose()

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serve_observed())
    except ObdError as exc:
        print(f"tcmu-obd run: error: {exc}", file=sys.stderr)
        sdnotify.status(f"error: {exc}")
        return EXIT_ERROR if started else EXIT_STARTUP_FAILURE
    finally:
        if started:
            sdnotify.stopping()


def _loop_factory():
    """uvloop when installed: a device read is one loop wakeup per command at queue depth 1, and
    uvloop's wakeup is several times cheaper than the pure-Python selector loop's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
