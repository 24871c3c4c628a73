"""The scheduler: sole caller of remote/ — priorities, in-flight dedup, adaptive concurrency, the filler.

See core.py (theory of operation) and control.py (the window controller), docs/scheduler.md.

The names below are loaded on first use, so that `fetch` can read SchedulerOptions (options.py)
before the scheduler and the modules it needs are imported (see tools/fetch.py).
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "AdaptiveWindow": "control",
    "FixedWindow": "control",
    "TokenBucket": "control",
    "WindowState": "control",
    "Fetcher": "core",
    "FillState": "core",
    "Priority": "core",
    "RemoteBlob": "core",
    "Scheduler": "core",
    "SchedulerStats": "core",
    "Transfer": "core",
    "SchedulerOptions": "options",
    "READ_PRIORITY": "prefetch",
    "ReplayStats": "prefetch",
    "TraceRecorder": "prefetch",
    "replay_trace": "prefetch",
    "trace_mode": "prefetch",
})
