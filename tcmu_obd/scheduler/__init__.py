"""The scheduler: sole caller of remote/ — priorities, in-flight dedup, adaptive concurrency, the filler.

See core.py (theory of operation) and control.py (the window controller), docs/scheduler.md.
"""

from .control import AdaptiveWindow, FixedWindow, TokenBucket, WindowState
from .core import (
    Fetcher,
    FillState,
    Priority,
    RemoteBlob,
    Scheduler,
    SchedulerOptions,
    SchedulerStats,
    Transfer,
)
from .prefetch import READ_PRIORITY, ReplayStats, TraceRecorder, replay_trace, trace_mode

__all__ = [
    "READ_PRIORITY",
    "ReplayStats",
    "TraceRecorder",
    "replay_trace",
    "trace_mode",
    "AdaptiveWindow",
    "Fetcher",
    "FillState",
    "FixedWindow",
    "Priority",
    "RemoteBlob",
    "Scheduler",
    "SchedulerOptions",
    "SchedulerStats",
    "TokenBucket",
    "Transfer",
    "WindowState",
]
