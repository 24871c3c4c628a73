"""`tcmu-obd status [--socket PATH] [--json]`: live numbers from running tcmu-obd processes.

Asks a running `run`, `serve` or `fetch` over its control socket (docs/observability.md)
and prints what it reports: bytes fetched and the rate per priority, bytes and requests in
flight, the adaptive window, cache hits and misses, registry retries by cause, per-layer fill
progress, per-device command counts. The numbers are the ones /metrics exposes.
Without --socket, every socket in the control directory (/run/tcmu-obd/control, or $TCMU_OBD_CONTROL_DIR)
is asked. --json prints the raw answers (a list). Exit status: 0, or 1 when no process answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ..errors import ObdError


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="live numbers from running tcmu-obd processes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", metavar="PATH", action="append",
                   help="control socket of one process (repeatable; default: every socket in the run directory)")
    p.add_argument("--json", action="store_true", help="print the raw answers as JSON")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from ..ops.control_socket import DEFAULT_DIR
    from ..ops.observability import prune_stale
    from ..ops.statusview import fetch_status, render, sockets_in

    run_dir = os.environ.get("TCMU_OBD_CONTROL_DIR") or DEFAULT_DIR
    if not args.socket:
        prune_stale(run_dir)  # sockets of killed processes: nobody to ask
    paths = args.socket or sockets_in(run_dir)
    if not paths:
        print(f"tcmu-obd status: no control socket in {run_dir} (is a tcmu-obd process running? "
              f"give --socket PATH)", file=sys.stderr)
        return 1

    async def ask_all():
        return await asyncio.gather(*(fetch_status(p) for p in paths), return_exceptions=True)

    answers = asyncio.run(ask_all())
    good = []
    for path, a in zip(paths, answers):
        if isinstance(a, ObdError):
            print(f"tcmu-obd status: {a}", file=sys.stderr)
        elif isinstance(a, BaseException):
            raise a
        else:
            good.append(a)
    if args.json:
        print(json.dumps(good, indent=1))
    else:
        print("\n\n".join(render(a) for a in good))
    return 0 if good else 1
