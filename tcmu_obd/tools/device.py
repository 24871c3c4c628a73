"""`tcmu-obd device WWN [--wait] [--timeout S] [--json]`: the block device of a LUN.

WWN is what configfs-scripts/obd-lun-create printed (`naa.1990000000000001`, with or
without the `naa.` prefix). Prints the device node(s), tcm_loop disk first, one per line
(with --json: a list of objects with node, serial, wwid, transport, by-id links, and how it
matched). Exit status 1 if nothing matches (after --timeout seconds with --wait).

Lookup order: configfs tcm_loop address, sysfs VPD serial/wwid of every SCSI disk, and the
udev database when udevd runs (see tcmu_obd/frontends/tcmu/udev.py).
"""

from __future__ import annotations

import json

from ..errors import ObdError


def register(subparsers) -> None:
    p = subparsers.add_parser("device", help="find the /dev/sdX of a TCMU LUN by its WWN/serial")
    p.add_argument("wwn", metavar="WWN", help="LUN WWN, e.g. naa.1990000000000001 (serial digits also work)")
    p.add_argument("--wait", action="store_true", help="wait for the disk to appear (udev/kernel uevent monitor)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait with --wait (default 30)")
    p.add_argument("--json", action="store_true", help="print details as JSON")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from ..frontends.tcmu import udev

    try:
        if args.wait:
            devs = udev.wait_for_device(args.wwn, args.timeout)
        else:
            devs = [d for d in udev.find_devices(args.wwn)]
    except (ValueError, RuntimeError, OSError) as e:
        raise ObdError(f"device lookup for {args.wwn}: {e}") from e
    if not devs:
        raise ObdError(f"no block device with WWN/serial {args.wwn}"
                       + (f" appeared within {args.timeout:g} s" if args.wait else ""))
    if args.json:
        print(json.dumps([d.to_dict() for d in devs], indent=1))
    else:
        for d in devs:
            print(d.node)
    return 0
