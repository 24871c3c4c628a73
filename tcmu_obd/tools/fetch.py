"""`tcmu-obd fetch [--global-config G] CONFIG`: download every remote lower of an image now.

Every lower that has a digest and no local file (file / dir/overlaybd.commit / ...) is filled
completely at full speed through the scheduler (download.delay and download.enable are
ignored), its sha256 verified; a lower with `dir` ends as `<dir>/overlaybd.commit`, others as
verified blobs in cacheDir. Progress: a live display on a TTY, log lines otherwise. An
interrupted fetch (SIGINT, SIGKILL, power cut) resumes from the durable presence maps.

Exit status: 0 when every blob is complete and verified; 1 on failure; 130 on SIGINT.
The final line (stdout) is machine readable: `fetch: done blobs=N fetched_bytes=B requests=R
seconds=S mbps=M` (bytes fetched by *this* run — benchmarks and the resume test read it).
"""

from __future__ import annotations

import argparse
import gc as collector
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from ..ops.control_socket import add_arguments

# Imported when the command runs, not here: the parser is built before the first burst's
# connections are started, and every module loaded ahead of them delays them (see handler).
if TYPE_CHECKING:
    from ..scheduler import Scheduler

log = logging.getLogger("tcmu_obd.fetch")
MiB = 1 << 20
# The first burst: requests that start together, each on a connection opened early. Every
# fresh connection starts from the registry's initial window (10 segments), so on a far link
# the ramp to its rate is decided by how many start at once; their total (FIRST_BURST ×
# FIRST_CHUNK, 64 MiB) is what 64 × 1 MiB was. On the 200 ms / 50 MB/s rig, 128 × 512 KiB
# reached the cap ~0.1 s sooner than 64 × 1 MiB and ended the 256 MiB fill ~0.15 s sooner
# (median 39.9 MB/s over 65 fills against 39.1 over 20); 96 × 512 KiB was between, 128 ×
# 384 KiB or 160-192 requests slower (more GETs for the registry's CPU, more stragglers at
# the end). The price: the registry's 128 flows overflow the rig's 30 MB bottleneck queue
# for a moment in about a third of the fills. docs/scheduler.md has the measurements.
FIRST_BURST = 128
FIRST_CHUNK = 512 * 1024


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    for suffix, m in (("kib", 1 << 10), ("k", 1 << 10), ("mib", MiB), ("m", MiB), ("gib", 1 << 30), ("g", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if v <= 0 or v % 4096:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive multiple of 4 KiB")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="download every remote layer of an image now (resumable, verified)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="image config.v1.json")
    p.add_argument("--global-config", metavar="G", help="overlaybd.json (default /etc/overlaybd/overlaybd.json)")
    p.add_argument(
        "--mode",
        choices=["adaptive", "fixed", "upstream"],
        default="adaptive",
        help="adaptive concurrency (default); fixed: --concurrency requests of --chunk-size; "
        "upstream: sequential download.blockSize requests, one in flight, one layer at a time",
    )
    p.add_argument("--concurrency", type=int, default=None,
                   help=f"fixed: requests in flight (16); adaptive: upper bound ({FIRST_BURST})")
    p.add_argument("--chunk-size", type=_size, default=None,
                   help="bytes per fill request (adaptive default: sized from the link, 256K-4M; "
                        "fixed: 4M; upstream mode: download.blockSize)")
    p.add_argument("--initial-requests", type=int, default=FIRST_BURST,
                   help=f"adaptive: requests in flight at the start (default {FIRST_BURST}: nothing else uses the link)")
    p.add_argument("--max-inflight", type=_size, default=None, help="upper bound on bytes in flight (default 256M)")
    p.add_argument("--max-mbps", type=float, default=0.0, help="throttle in MiB/s (default 0: unthrottled)")
    p.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between plain progress lines")
    p.add_argument("--read-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="give up on a response that sends nothing for this long and ask again for the rest "
                        "(default 30)")
    p.add_argument("--stats-json", metavar="FILE", help="write final stats (scheduler + registry client) as JSON")
    add_arguments(p)  # --control-socket (tcmu-obd status); exporterConfig and logs come from G
    # every file is closed and the blobs committed when handler returns (cli._exit_now)
    p.set_defaults(func=handler, exit_without_teardown=True)


class _StartUpWithoutGC:
    """The cyclic garbage collector paused while fetch starts.

    Loading the HTTP client and our modules creates tens of thousands of objects, and the
    collector went over them again and again (~50 ms of the ~0.4 s before the first request,
    measured over 12 starts each way). `resume()` (when the first response arrives) freezes
    everything that exists by then, so later collections during the fill never walk it again,
    and turns collection back on; leaving the block restores the state found."""

    def __enter__(self) -> "_StartUpWithoutGC":
        self._was_enabled = collector.isenabled()
        self._froze = False
        collector.disable()
        return self

    def resume(self) -> None:
        if self._was_enabled and not collector.isenabled():
            collector.freeze()
            self._froze = True
            collector.enable()

    def __exit__(self, *exc) -> None:
        self.resume()
        if self._froze:
            collector.unfreeze()


def handler(args) -> int:
    with _StartUpWithoutGC() as start_up:
        return _run(args, start_up)


def _run(args, start_up: _StartUpWithoutGC) -> int:
    from ..config import load_global_config, load_image_config, local_layer_candidates

    gc = load_global_config(args.global_config)
    cfg = load_image_config(args.config, gc)
    remote = [
        lower
        for lower in cfg.lowers
        if lower.digest and not any(os.path.exists(p) for p in local_layer_candidates(lower))
    ]
    # The first burst's TCP handshakes run in the kernel while the HTTP client, cache and
    # scheduler modules load below (~0.3 s, more than a far registry's round trip).
    opts = _options(args)
    early = _preconnect(gc, cfg, remote, opts)
    import asyncio

    try:
        return asyncio.run(fetch(args, gc, cfg, remote, opts, early, start_up))
    finally:
        if early is not None:
            early.close()


def _preconnect(gc, cfg, remote, opts):
    """A started Preconnector to the first host the blob reads will go to, or None (nothing
    remote, a proxy in the way, or an unusable URL)."""
    from ..remote.endpoints import endpoints
    from ..remote.preconnect import Preconnector
    from ..remote.proxy import proxy_for

    if not remote or not cfg.repo_blob_url:
        return None
    first = endpoints(gc, cfg.blob_url(remote[0].digest))[0].connect_url
    if proxy_for(first) is not None:
        return None
    try:
        return Preconnector(first, opts.first_burst).start()
    except ValueError as e:
        log.debug("no preconnect: %s", e)
        return None


def _options(args):
    from ..scheduler.options import SchedulerOptions

    o = SchedulerOptions(mode=args.mode, max_mbps=args.max_mbps, initial_requests=args.initial_requests,
                         initial_chunk=FIRST_CHUNK, max_concurrency=FIRST_BURST,
                         stagger_first_burst=True, queue_signal="first_byte", chunk_bdp_fraction=0.1)
    if args.chunk_size:
        o.fill_chunk = args.chunk_size
    if args.max_inflight:
        o.max_inflight_bytes = args.max_inflight
    if args.concurrency:
        if args.mode == "fixed":
            o.fixed_concurrency = args.concurrency
        else:
            o.max_concurrency = args.concurrency
    return o


async def fetch(args, gc, cfg, remote, opts, early=None, start_up: _StartUpWithoutGC | None = None) -> int:
    import asyncio
    import json

    from ..cache import CacheStore
    from ..ops.observability import ServiceOps
    from ..remote.registry import RegistryClient, Timeouts
    from ..scheduler import Priority, Scheduler
    from ..scheduler.options import pool_for

    if not remote:
        print("fetch: nothing to do: every lower is local", flush=True)
        print("fetch: done blobs=0 fetched_bytes=0 requests=0 seconds=0.0 mbps=0.0", flush=True)
        return 0
    timeouts = Timeouts(sock_read=args.read_timeout) if args.read_timeout is not None else None
    ops = ServiceOps("fetch", gc, args.control_socket)
    # the whole window may go to the fill: nothing reads in the foreground here
    client = RegistryClient(gc, max_connections=pool_for(opts.max_concurrency), timeouts=timeouts,
                            socket_factory=early.socket_factory if early is not None else None)
    store = CacheStore.from_config(gc)
    sched = Scheduler(client, store, gc, opts)
    if args.mode == "upstream" and args.chunk_size:
        sched.fill_chunk = args.chunk_size
    started = time.monotonic()
    sources = []
    display = None
    rc = 1
    try:
        for lower in remote:
            sources.append(await sched.open_blob(cfg, lower))
        for src in sources:
            sched.start_fill(src, delay=0)
        waits = [asyncio.ensure_future(sched.wait_filled(s)) for s in sources]
        # The control socket, metrics and progress display load ~50 ms of modules (aiohttp.web,
        # prometheus_client, rich). Until the first response arrives every millisecond of CPU
        # spent here delays the first requests, so they start then (or after a second at most:
        # a fetch stuck on an unreachable registry must still answer `tcmu-obd status`).
        receiving = asyncio.ensure_future(sched.fill_receiving.wait())
        await asyncio.wait([receiving, *waits], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        receiving.cancel()
        if start_up is not None:
            start_up.resume()
        await ops.start(info={"config": args.config})
        total = sum(s.size for s in sources)
        display = _make_display(args, sched, sources, total)
        progress = asyncio.ensure_future(display.run()) if display else None
        results = await asyncio.gather(*waits, return_exceptions=True)
        if progress:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        failed = [(s, r) for s, r in zip(sources, results) if isinstance(r, BaseException)]
        for s, r in failed:
            print(f"fetch: {s.digest}: {r}", file=sys.stderr, flush=True)
        ok = not failed and all(s.cache.verified for s in sources)
        rc = 0 if ok else 1
    finally:
        if display:
            display.stop()
        elapsed = time.monotonic() - started
        fetched = sched.stats.total_fetched
        reqs = sum(sched.stats.requests.values())
        for s in sources:
            await s.aclose()
        await sched.aclose()
        await store.aclose()
        await client.aclose()
        await ops.aclose()
        if args.stats_json:
            with open(args.stats_json, "w") as f:
                json.dump(
                    {
                        "ok": rc == 0,
                        "seconds": elapsed,
                        "fetched_bytes": fetched,
                        "requests": {p.name: sched.stats.requests[p] for p in Priority},
                        "bytes": {p.name: sched.stats.bytes_fetched[p] for p in Priority},
                        "failures": {p.name: sched.stats.failures[p] for p in Priority},
                        "client": client.stats.snapshot(),
                        "mismatches": sum(s.cache.mismatches for s in sources),
                        "repaired_bytes": sum(s.cache.repaired_bytes for s in sources),
                        "hedges": sched.stats.hedges,
                        "hedged_bytes": sched.stats.hedged_bytes,
                        "preconnect": early.stats() if early is not None else None,
                        "mode": args.mode,
                        "window": repr(sched.window),
                    },
                    f,
                    indent=1,
                )
        mbps = fetched / elapsed / 1e6 if elapsed > 0 else 0.0
        print(
            f"fetch: {'done' if rc == 0 else 'failed'} blobs={len(sources)} fetched_bytes={fetched} "
            f"requests={reqs} seconds={elapsed:.2f} mbps={mbps:.1f}",
            flush=True,
        )
    return rc


class _Display:
    """Progress: MB/s, bytes in flight, concurrency, ETA."""

    def __init__(self, args, sched: Scheduler, sources, total: int):
        self.sched, self.sources, self.total = sched, sources, total
        self.interval = args.interval
        self._last = (time.monotonic(), self._present())
        self._rate = 0.0

    def _present(self) -> int:
        return sum(s.cache.present_bytes for s in self.sources)

    def sample(self) -> dict:
        now, present = time.monotonic(), self._present()
        t0, p0 = self._last
        if now - t0 >= 0.5:
            inst = (present - p0) / (now - t0)
            self._rate = inst if self._rate == 0 else 0.7 * self._rate + 0.3 * inst
            self._last = (now, present)
        left = self.total - present
        eta = left / self._rate if self._rate > 0 else float("inf")
        w = self.sched.window
        return dict(
            present=present,
            rate=self._rate,
            inflight=self.sched.inflight_bytes,
            requests=self.sched.inflight_requests,
            window=w.window_bytes,
            state=w.state.value,
            eta=eta,
            verified=sum(1 for s in self.sources if s.cache.verified),
        )

    def line(self) -> str:
        d = self.sample()
        eta = "?" if d["eta"] == float("inf") else f"{d['eta']:.0f}s"
        pct = 100.0 * d["present"] / self.total if self.total else 100.0
        return (
            f"fetch: {d['present'] / MiB:.1f}/{self.total / MiB:.1f} MiB ({pct:.0f}%) "
            f"{d['rate'] / 1e6:.1f} MB/s in-flight {d['inflight'] / MiB:.1f} MiB/{d['requests']} req "
            f"window {d['window'] / MiB:.0f} MiB ({d['state']}) verified {d['verified']}/{len(self.sources)} ETA {eta}"
        )

    async def run(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self.interval)
            print(self.line(), flush=True)

    def stop(self) -> None:
        pass


class _RichDisplay(_Display):
    def __init__(self, *a):
        super().__init__(*a)
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]fetch"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[flight]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task("fetch", total=self.total, rate="", flight="")
        self.progress.start()

    async def run(self) -> None:
        import asyncio

        while True:
            d = self.sample()
            self.progress.update(
                self.task,
                completed=d["present"],
                rate=f"{d['rate'] / 1e6:.1f} MB/s",
                flight=f"in flight {d['inflight'] / MiB:.0f} MiB/{d['requests']} req, window {d['window'] / MiB:.0f} MiB",
            )
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        d = self.sample()
        self.progress.update(self.task, completed=d["present"])
        self.progress.stop()


def _make_display(args, sched, sources, total):
    mode = args.progress
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    if mode == "none":
        return None
    if mode == "rich":
        return _RichDisplay(args, sched, sources, total)
    return _Display(args, sched, sources, total)
