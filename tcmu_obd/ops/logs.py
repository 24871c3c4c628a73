"""Log files from overlaybd.json: `logConfig` (or the legacy top-level `logLevel`/`logPath`)
and the audit log (`enableAudit`, `auditPath`), with the standard library's logging.

Which commands write files: `tcmu-obd run` is the drop-in for overlaybd-tcmu, so it follows
upstream's defaults whenever the global config comes from a file (logs to
/var/log/overlaybd.log, audit on, to /var/log/overlaybd-audit.log, unless the file says
otherwise). `serve` and `fetch` write a log file or an audit log only when the file names
them explicitly (`logConfig.logPath` or `logPath`; `enableAudit: true` or `auditPath`), so a
one-shot tool never writes to the daemon's logs by surprise. Built-in defaults (no file):
stderr only, no audit, for every command.

A log file that cannot be opened is reported on stderr and skipped: losing the log file is
no reason to stop serving devices.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from dataclasses import dataclass, field

from ..config import GlobalConfig
from ..errors import ConfigError
from . import audit as _audit

MiB = 1 << 20
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
AUDIT_FORMAT = "%(asctime)s %(message)s"
AUDIT_SIZE_MB, AUDIT_ROTATE = 10, 3  # upstream's audit file: 10 MB × 3
LEGACY_SIZE_MB, LEGACY_ROTATE = 10, 3

# upstream's (photon's) numeric levels; 4 and up (FATAL, TEMP, AUDIT) are all CRITICAL here
_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


@dataclass(frozen=True)
class LogPlan:
    """What configure() will do: the log file (path "" = none) and the audit file."""

    log_path: str = ""
    level: int = logging.INFO
    size_mb: int = 10
    rotate: int = 3
    audit_path: str = ""


@dataclass
class LogSetup:
    plan: LogPlan
    handlers: list[logging.Handler] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Detach and close the handlers configure() added (the audit log goes quiet again)."""
        root = logging.getLogger()
        for h in self.handlers:
            root.removeHandler(h)
            _audit.detach(h)
            h.close()
        self.handlers.clear()


def level_of(value: int, where: str, source: str) -> int:
    if value < 0 or value > 6:
        raise ConfigError(f"{source}: {where} must be 0 (DEBUG) .. 3 (ERROR), got {value}")
    return _LEVELS.get(value, logging.CRITICAL)


def _raw(source: str) -> dict:
    try:
        with open(source) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # load_global_config already accepted it; nothing more to learn here
    return data if isinstance(data, dict) else {}


def plan(gc: GlobalConfig, *, upstream_defaults: bool) -> LogPlan:
    """Resolve the effective log/audit settings (see the module doc for which apply when)."""
    if not gc.source:
        return LogPlan()
    src = gc.source
    lc = gc.log_config
    if lc.log_path:
        path, level = lc.log_path, level_of(lc.log_level, "logConfig.logLevel", src)
        size_mb, rotate = lc.log_size_mb, lc.log_rotate_num
    else:
        path, level = gc.log_path, level_of(gc.log_level, "logLevel", src)
        size_mb, rotate = LEGACY_SIZE_MB, LEGACY_ROTATE
    if size_mb <= 0:
        raise ConfigError(f"{src}: logConfig.logSizeMB must be > 0, got {size_mb}")
    if rotate < 0:
        raise ConfigError(f"{src}: logConfig.logRotateNum must be >= 0, got {rotate}")
    audit_path = gc.audit_path if gc.enable_audit else ""
    if not upstream_defaults:
        raw = _raw(src)
        lc_raw = raw.get("logConfig")
        named_log = bool(isinstance(lc_raw, dict) and lc_raw.get("logPath")) or bool(raw.get("logPath"))
        if not named_log:
            path = ""
        if not (raw.get("enableAudit") is True or (gc.enable_audit and "auditPath" in raw)):
            audit_path = ""
    return LogPlan(log_path=path, level=level, size_mb=size_mb, rotate=rotate, audit_path=audit_path)


def _open(path: str, size_mb: int, rotate: int) -> logging.Handler:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return logging.handlers.RotatingFileHandler(path, maxBytes=size_mb * MiB, backupCount=rotate)


def configure(gc: GlobalConfig, *, upstream_defaults: bool) -> LogSetup:
    """Attach the log file (to the root logger) and the audit file, as planned."""
    p = plan(gc, upstream_defaults=upstream_defaults)
    setup = LogSetup(p)
    if p.log_path:
        try:
            h = _open(p.log_path, p.size_mb, p.rotate)
        except OSError as e:
            setup.errors.append(f"log file {p.log_path}: {e.strerror or e}")
        else:
            h.setLevel(p.level)
            h.setFormatter(logging.Formatter(FORMAT))
            root = logging.getLogger()
            # the console keeps its -v level; the root passes the file's level through
            for existing in root.handlers:
                if existing.level == logging.NOTSET:
                    existing.setLevel(root.level or logging.WARNING)
            root.addHandler(h)
            root.setLevel(min(root.level or logging.WARNING, p.level))
            setup.handlers.append(h)
    if p.audit_path:
        try:
            h = _open(p.audit_path, AUDIT_SIZE_MB, AUDIT_ROTATE)
        except OSError as e:
            setup.errors.append(f"audit file {p.audit_path}: {e.strerror or e}")
        else:
            h.setFormatter(logging.Formatter(AUDIT_FORMAT))
            _audit.attach(h)
            setup.handlers.append(h)
    return setup
