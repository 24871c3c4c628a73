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
