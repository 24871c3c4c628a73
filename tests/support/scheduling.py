"""Test helpers around the scheduler."""

from __future__ import annotations

import asyncio


async def transfers_done(scheduler) -> None:
    """Return once every transfer in flight has ended. A reader is released as soon as its own
    bytes land, while the refill-aligned rest of its transfer may still be arriving; a transfer
    is counted (stats.bytes_fetched, requests) when it ends. Counters read right after a read
    returns can therefore lag by the transfers still running: await this first."""
    tasks = [t.task for b in scheduler.blobs() for t in (*b.inflight, *b.extra) if t.task is not None]
    await asyncio.gather(*tasks, return_exceptions=True)


def assert_fetched_once(fetched: int, expected: int, hedged_bytes: int) -> None:
    """`fetched` is `expected` exactly, but for the fill endgame asking again for a stalled
    transfer (on a loaded machine one can stall even on loopback): both copies may land, so
    at most `hedged_bytes` (SchedulerStats.hedged_bytes) more."""
    extra = fetched - expected
    assert 0 <= extra <= hedged_bytes, (fetched, expected, hedged_bytes)
