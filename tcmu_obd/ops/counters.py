"""Process-wide command counters for the frontends (SCSI over TCMU, NBD).

The frontends call `record` once per completed command; it only bumps an int in a dict, so
the command path pays one dict update. The Prometheus collector and `tcmu-obd status` read
the dict at scrape time (on the event loop thread, like the writers).
"""

from __future__ import annotations


class CommandCounters:
    """Completed commands by (device, opcode, status)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int, int], int] = {}

    def record(self, device: str, opcode: int, status: int) -> None:
        key = (device, opcode, status)
        self.counts[key] = self.counts.get(key, 0) + 1

    def add(self, device: str, opcode: int, status: int, count: int) -> None:
        """`count` completions at once (a batched ring drain)."""
        key = (device, opcode, status)
        self.counts[key] = self.counts.get(key, 0) + count

    def items(self) -> list[tuple[tuple[str, int, int], int]]:
        return list(self.counts.items())

    def clear(self) -> None:
        self.counts.clear()


# SCSI: opcode = CDB byte 0, status = SAM status (0 GOOD, 2 CHECK CONDITION, ...).
SCSI_COMMANDS = CommandCounters()
# NBD: opcode = NBD_CMD_*, status = the errno sent in the reply (0 = success).
NBD_COMMANDS = CommandCounters()
