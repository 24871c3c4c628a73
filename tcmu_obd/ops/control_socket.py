"""Where control sockets live, and the option that names one.

Kept apart from ops.observability (the sockets themselves, on asyncio): `fetch` builds its
command line before it starts its first connections, so nothing here may pull in asyncio.
"""

from __future__ import annotations

DEFAULT_DIR = "/run/tcmu-obd/control"  # its own directory: /run/tcmu-obd also holds NBD sockets


def add_arguments(parser) -> None:
    """The command-line side (run, serve, fetch)."""
    parser.add_argument("--control-socket", metavar="PATH|none", default=None,
                        help=f"control socket for `tcmu-obd status` (default {DEFAULT_DIR}/<command>-<pid>.sock; "
                             "none: no socket)")
