"""The audit log (overlaybd.json `enableAudit`, `auditPath`): one line per notable event.

Events: a device opened or closed (TCMU LUN attached/detached, NBD export opened/closed), a
background fill started, finished and verified (or failed verification, or gave up), and a
slow foreground read. A line is `<timestamp> <event> key=value ...`; values with spaces or
quotes are JSON-quoted, so a line splits on spaces unambiguously.

Writers call `audit(...)`; where the lines go is decided once at start by
`ops.logs.configure` (a size-rotated file, or nowhere). Until then the logger is disabled,
so a library user or a test that never configures it pays one flag check per event.
"""

from __future__ import annotations

import json
import logging

AUDIT_LOGGER = "tcmu_obd.audit"
# A foreground read that waits this long for the registry is audited as slow_read
# (Scheduler.slow_read_seconds overrides it per scheduler).
SLOW_READ_SECONDS = 1.0

_log = logging.getLogger(AUDIT_LOGGER)
_log.propagate = False
_log.disabled = True


def _value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    s = str(v)
    if not s or any(c in s for c in ' "\n\t'):
        return json.dumps(s)
    return s


def format_event(event: str, fields: dict) -> str:
    return " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items())])


def audit(event: str, **fields: object) -> None:
    if _log.disabled:
        return
    _log.info(format_event(event, fields))


def logger() -> logging.Logger:
    return _log


_sinks: list[logging.Handler] = []


def attach(handler: logging.Handler) -> None:
    """Send audit lines to `handler` too (enables the audit log)."""
    _sinks.append(handler)
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.disabled = False


def detach(handler: logging.Handler) -> None:
    """Stop sending to `handler`; with no sink left the audit log is disabled again."""
    if handler in _sinks:
        _sinks.remove(handler)
    _log.removeHandler(handler)
    if not _sinks:
        _log.disabled = True
