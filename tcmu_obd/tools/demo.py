"""`tcmu-obd demo`: build an image, serve it from a local registry over an emulated slow
link, read files from it lazily over NBD while the background filler runs, compare with
upstream's one-chunk-at-a-time pattern. Needs only this checkout and scripts/setup.sh's
packages; leaves nothing running or on disk (unless --keep). See docs/demo.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end-to-end demo: lazy loading + background fill over a slow link",
                              description=__doc__)
    p.add_argument("--keep", metavar="DIR", type=Path, default=None,
                   help="work in DIR (must be empty or new) and keep it afterwards")
    p.add_argument("--rtt-ms", type=float, default=200.0, help="emulated round-trip time (default 200)")
    p.add_argument("--rate-mbps", type=float, default=50.0, help="emulated link rate, Mbit/s (default 50)")
    p.add_argument("--size-mib", type=int, default=80, help="MiB of file data in the image (default 80)")
    p.add_argument("--no-docker-registry", action="store_true",
                   help="use the in-process registry even when docker-registry is installed")
    p.add_argument("--baseline-s", type=float, default=5.0,
                   help="how long to measure upstream's sequential pattern (default 5)")
    p.add_argument("--json", metavar="RESULT", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..demo.run import DemoOptions, run_demo

    for name in ("rtt_ms", "baseline_s"):
        if getattr(args, name) < 0:
            print(f"tcmu-obd demo: error: --{name.replace('_', '-')} must not be negative", file=sys.stderr)
            return 2
    if args.rate_mbps <= 0 or args.size_mib < 1:
        print("tcmu-obd demo: error: --rate-mbps must be > 0 and --size-mib ≥ 1", file=sys.stderr)
        return 2
    opts = DemoOptions(rtt_ms=args.rtt_ms, rate_mbps=args.rate_mbps, size_mib=args.size_mib,
                       docker_registry=not args.no_docker_registry, keep=args.keep, json_path=args.json,
                       baseline_s=args.baseline_s, plain=True if args.plain else None)
    result = run_demo(opts)
    if not result.get("ok"):
        failed = [k for k, v in result.get("checks", {}).items() if not v]
        print(f"tcmu-obd demo: FAILED checks: {', '.join(failed) or 'unknown'}", file=sys.stderr)
        return 1
    return 0
