"""The demo's order of events (see tcmu_obd/demo/__init__.py and docs/demo.md).

    build (sync) → registry + push → slow link → configs → Scheduler + open_image →
    start the fill → NBDServer on a unix socket → timed file reads over NBD → small-read
    probes until every layer is verified → whole-export sha256 (nbdcopy) → close all →
    upstream-like baseline (Scheduler mode "upstream") on the same link → summary.

Everything is started inside one AsyncExitStack, so it is stopped in reverse order on
success, error and Ctrl-C alike; the temp dir is removed by `run_demo` unless --keep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..errors import ObdError
from . import build as buildmod
from .link import SlowLink
from .nbdclient import NBDClient, NBDClientError
from .registry import start_registry

MiB = 1 << 20
MB = 1e6
PROBE_BYTES = 4096
PROBE_PACE_S = 0.1  # one small read every 100 ms while the fill runs (open loop)
PROBE_MAX_OUTSTANDING = 64
PROBE_DRAIN_S = 30.0
FILE_PIECE = 1 * MiB
FILE_PIPELINE = 8
APPROX_NOTE = ("link = in-process TCP proxy (RTT + shared rate cap; no slow start/loss) — an approximation; "
               "the real benchmark, bench/fill_bench.py, uses a TUN delay line between network namespaces")


class DemoFailed(ObdError):
    """A demo check failed (content mismatch, layer not verified, fill timeout...)."""


@dataclass
class DemoOptions:
    rtt_ms: float = 200.0
    rate_mbps: float = 50.0
    size_mib: int = 80
    docker_registry: bool = True
    keep: Path | None = None
    json_path: Path | None = None
    baseline_s: float = 5.0
    fill_timeout_s: float = 600.0
    plain: bool | None = None  # None: rich on a TTY, plain lines otherwise
    scheduler_options: object | None = None  # a SchedulerOptions (experiments); None = defaults

    @property
    def rate_bytes(self) -> float:
        return self.rate_mbps * 1e6 / 8


def pct(values: list[float], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation; None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"


# ------------------------------------------------------------------------------------ output


class Reporter:
    """rich on a TTY, plain lines otherwise; the same calls either way."""

    def __init__(self, plain: bool | None = None, stream=None):
        self.stream = stream or sys.stdout
        self.plain = (not self.stream.isatty()) if plain is None else plain
        self.console = None
        if not self.plain:
            from rich.console import Console

            self.console = Console(file=self.stream, highlight=False)
        self._live = None

    def rule(self, title: str) -> None:
        if self.console:
            self.console.rule(f"[bold]{title}")
        else:
            print(f"== {title}", file=self.stream, flush=True)

    def line(self, text: str, style: str | None = None) -> None:
        if self.console:
            self.console.print(text, style=style, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        if self.console:
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for i, h in enumerate(header):
                t.add_column(h, justify="left" if i == 0 else "right")
            for r in rows:
                t.add_row(*r)
            self.console.print(t)
            return
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        print(f"-- {title}", file=self.stream)
        for r in [header, *rows]:
            print("  " + "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                                   for i, (x, w) in enumerate(zip(r, widths))), file=self.stream)
        self.stream.flush()

    # live fill progress
    def progress_start(self) -> None:
        if self.console:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()

    def progress(self, snap: dict) -> None:
        layers = "  ".join(f"L{i + 1} {p:5.1f}%" for i, p in enumerate(snap["layer_pct"]))
        text = (f"fill {snap['t']:5.1f}s  wire {snap['MBps']:5.2f} MB/s  in flight {snap['inflight_requests']:3d} req "
                f"/ {snap['inflight_bytes'] / MiB:5.1f} MiB  {layers}  fg reads {snap['probes']}")
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(text))
        else:
            print(text, file=self.stream, flush=True)

    def progress_stop(self) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None


# ------------------------------------------------------------------------------------ configs


def write_configs(workdir: Path, repo_blob_url: str, built: buildmod.BuiltImage) -> tuple[Path, Path, list[Path]]:
    """overlaybd.json (cache in the temp dir, download on, no delay) and config.v1.json."""
    dirs = [workdir / "layers" / f"layer{i + 1}" for i in range(len(built.layers))]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    gpath = workdir / "overlaybd.json"
    gpath.write_text(json.dumps({
        "logConfig": {"logLevel": 1, "logPath": str(workdir / "overlaybd.log")},
        "cacheConfig": {"cacheType": "file", "cacheDir": str(workdir / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(workdir / "cred.json")},
        "download": {"enable": True, "delay": 0, "delayExtra": 0, "maxMBps": 0, "tryCnt": 5,
                     "blockSize": 262144},
        "enableAudit": False,
    }, indent=2))
    cpath = workdir / "config.v1.json"
    cpath.write_text(json.dumps({
        "repoBlobUrl": repo_blob_url,
        "lowers": [{"digest": layer.digest, "size": layer.size, "dir": str(d)}
                   for layer, d in zip(built.layers, dirs)],
        "resultFile": str(workdir / "init-debug.log"),
        "download": {"enable": True, "delay": 0, "delayExtra": 0, "maxMBps": 0, "tryCnt": 5,
                     "blockSize": 262144},
    }, indent=2))
    return gpath, cpath, dirs


# ------------------------------------------------------------------------------------ phases


async def _read_file(client: NBDClient, f: buildmod.DemoFile) -> dict:
    """Read a file's blocks over NBD: first 4 KiB alone (time to first byte), then the rest
    in 1 MiB pieces, up to 8 in flight, as a kernel's readahead would."""
    t0 = time.monotonic()
    first_off, first_len = f.extents[0]
    head_len = min(PROBE_BYTES, first_len)
    head, ttfb = await client.read_timed(first_off, head_len)
    pieces: list[tuple[int, int]] = []
    for i, (off, length) in enumerate(f.extents):
        if i == 0:
            off, length = off + head_len, length - head_len
        while length > 0:
            n = min(FILE_PIECE, length)
            pieces.append((off, n))
            off, length = off + n, length - n
    sem = asyncio.Semaphore(FILE_PIPELINE)

    async def one(off: int, n: int) -> bytes:
        async with sem:
            return await client.read(off, n)

    rest = await asyncio.gather(*(one(o, n) for o, n in pieces))
    h = hashlib.sha256(head)
    for part in rest:
        h.update(part)
    total = time.monotonic() - t0
    return {"path": f.path, "size": f.size, "layer": f.layer, "ttfb_s": ttfb, "total_s": total,
            "ok": h.hexdigest() == f.sha256}


async def _hash_export(sock: str, size: int) -> tuple[str, str]:
    """sha256 of the whole export, through nbdcopy (a real client) when installed."""
    nbdcopy = shutil.which("nbdcopy")
    if nbdcopy:
        uri = f"nbd+unix:///?socket={sock}"
        proc = await asyncio.create_subprocess_exec(nbdcopy, "--connections=4", uri, "-",
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    stdin=asyncio.subprocess.DEVNULL)
        h = hashlib.sha256()
        n = 0
        try:
            while chunk := await proc.stdout.read(4 * MiB):
                h.update(chunk)
                n += len(chunk)
            err = await proc.stderr.read()
            rc = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if rc != 0 or n != size:
            raise DemoFailed(f"nbdcopy exited {rc} after {n} of {size} bytes: {err.decode(errors='replace')[-300:]}")
        return h.hexdigest(), "nbdcopy"
    client = await NBDClient.connect_unix(sock)
    try:
        h = hashlib.sha256()
        for off in range(0, size, 4 * MiB):
            h.update(await client.read(off, min(4 * MiB, size - off)))
        return h.hexdigest(), "built-in NBD client"
    finally:
        await client.aclose()


def _probe_offsets(image, rng: random.Random):
    """A function returning random 4 KiB-aligned offsets inside the image's data extents."""
    data = [(e.offset, e.length) for e in image.extents(0, image.size) if e.kind == "data"]
    total = sum(n for _o, n in data)

    def pick() -> int:
        x = rng.randrange(max(1, total // PROBE_BYTES)) * PROBE_BYTES
        for off, n in data:
            if x < n:
                return min(off + x, image.size - PROBE_BYTES) // PROBE_BYTES * PROBE_BYTES
            x -= n
        return 0

    return pick


async def _baseline(opts: DemoOptions, workdir: Path, url: str, layer: buildmod.Layer, gcfg) -> dict:
    """Upstream's pattern on the same link: one 256 KiB range GET at a time (the scheduler's
    "upstream" mode), for at most `baseline_s` seconds; MB/s and the projected fill time."""
    from ..cache import CacheStore
    from ..remote.registry import RegistryClient
    from ..scheduler import Priority, Scheduler, SchedulerOptions

    async with contextlib.AsyncExitStack() as stack:
        client = RegistryClient(gcfg)
        stack.push_async_callback(client.aclose)
        store = CacheStore(str(workdir / "cache-upstream"), 1 << 30, gcfg.effective_cache.refill_size)
        stack.push_async_callback(store.aclose)
        sched = Scheduler(client, store, gcfg, SchedulerOptions(mode="upstream"))
        stack.push_async_callback(sched.aclose)
        bdir = workdir / "upstream-layer1"
        bdir.mkdir()
        blob = await sched.open_remote(url, layer.digest, layer.size, dir=str(bdir))
        t0 = time.monotonic()
        sched.start_fill(blob, delay=0)
        finished = False
        try:
            await asyncio.wait_for(sched.wait_filled(blob), opts.baseline_s)
            finished = True
        except asyncio.TimeoutError:
            pass
        elapsed = time.monotonic() - t0
        got = sched.stats.bytes_fetched[Priority.FILL]
        reqs = sched.stats.requests[Priority.FILL]
        sched.stop_fill(blob)
    rate = got / elapsed if elapsed > 0 else 0.0
    return {"mode": "scheduler upstream mode (1 × download.blockSize GET in flight)",
            "chunk_bytes": gcfg.download.block_size, "seconds": elapsed, "bytes": got, "requests": reqs,
            "MBps": rate / MB, "finished": finished}


async def serve_and_read(opts: DemoOptions, built: buildmod.BuiltImage, workdir: Path, ui: Reporter) -> dict:
    from ..cache import CacheStore
    from ..config import load_global_config
    from ..frontends.nbd.server import NBDServer
    from ..image.stack import open_image
    from ..remote.registry import RegistryClient
    from ..scheduler import Priority, Scheduler

    result: dict = {}
    async with contextlib.AsyncExitStack() as outer:
        ui.rule("2. registry")
        reg = await start_registry(workdir / "registry", prefer_docker=opts.docker_registry)
        outer.push_async_callback(reg.aclose)
        for layer in built.layers:
            digest = await reg.push(layer.path)
            if digest != layer.digest:
                raise DemoFailed(f"registry stored {layer.path.name} as {digest}, expected {layer.digest}")
        ui.line(f"{reg.kind} on {reg.url}: pushed {len(built.layers)} blobs to {reg.repo}")
        result["registry"] = reg.kind

        ui.rule("3. slow link")
        link = await SlowLink("127.0.0.1", reg.port, rtt_s=opts.rtt_ms / 1000, rate_bytes=opts.rate_bytes).start()
        outer.push_async_callback(link.aclose)
        ui.line(f"{link.url} → {reg.url}: RTT {opts.rtt_ms:.0f} ms, {opts.rate_mbps:g} Mbit/s "
                f"({opts.rate_bytes / MB:.2f} MB/s) shared by all connections")
        ui.line(f"note: {APPROX_NOTE}")
        result["link"] = {"rtt_ms": opts.rtt_ms, "rate_mbps": opts.rate_mbps, "note": APPROX_NOTE}

        repo_blob_url = f"{link.url}/v2/{reg.repo}/blobs"
        gpath, cpath, dirs = write_configs(workdir, repo_blob_url, built)
        gcfg = load_global_config(gpath)

        ui.rule("4. serve: open_image + scheduler + NBD")
        async with contextlib.AsyncExitStack() as stack:
            client = RegistryClient(gcfg)
            stack.push_async_callback(client.aclose)
            store = CacheStore.from_config(gcfg)
            stack.push_async_callback(store.aclose)
            sched = Scheduler(client, store, gcfg, opts.scheduler_options)
            stack.push_async_callback(sched.aclose)
            t_open = time.monotonic()
            image = await open_image(cpath, gcfg, scheduler=sched, read_only=True)
            stack.push_async_callback(image.aclose)
            open_s = time.monotonic() - t_open
            open_bytes = sched.stats.total_fetched
            by_digest = {b.digest: b for b in sched.blobs()}
            blobs = [by_digest[layer.digest] for layer in built.layers]
            t_fill0 = time.monotonic()
            for b in blobs:
                sched.start_fill(b, delay=0)
            sock = str(workdir / "nbd.sock")
            server = NBDServer(image, read_only=True, description="tcmu-obd demo")
            await server.serve_unix(sock)
            stack.push_async_callback(server.aclose, 0)
            ui.line(f"image opened in {_ms(open_s)}: {image.size // MiB} MiB disk, {len(blobs)} layers, "
                    f"{open_bytes / MiB:.1f} of {sum(b.size for b in blobs) / MiB:.1f} MiB fetched "
                    f"(headers, indexes, jump tables)")
            ui.line(f"background fill started; NBD export on nbd+unix:///?socket={sock}")

            ui.rule("5. read files lazily over NBD while the filler runs")
            nbd = await NBDClient.connect_unix(sock)
            stack.push_async_callback(nbd.aclose)
            prober_nbd = await NBDClient.connect_unix(sock)  # small reads on their own connection
            stack.push_async_callback(prober_nbd.aclose)
            rng = random.Random(7)
            pick = _probe_offsets(image, rng)
            probes: list[float] = []
            probe_errors: list[str] = []
            probes_with_files: list[float] = []  # issued while the file reads (also foreground) ran
            probes_fill_only: list[float] = []  # issued after them: only the filler competes
            files_busy = asyncio.Event()
            files_busy.set()
            peak = {"requests": 0, "bytes": 0}
            total_blob = sum(b.size for b in blobs)
            done = asyncio.Event()

            def snapshot(window: collections.deque) -> dict:
                """Wire MB/s over the last second (transfers complete in whole chunks, so
                the link's delivered-byte counter is the smooth measure)."""
                now = time.monotonic()
                fetched = link.bytes_down
                window.append((now, fetched))
                while len(window) > 2 and now - window[1][0] >= 1.0:
                    window.popleft()
                prev = window[0]
                dt = max(1e-6, now - prev[0])
                peak["requests"] = max(peak["requests"], sched.inflight_requests)
                peak["bytes"] = max(peak["bytes"], sched.inflight_bytes)
                snap = {"t": now - t_fill0, "MBps": (fetched - prev[1]) / dt / MB,
                        "inflight_requests": sched.inflight_requests, "inflight_bytes": sched.inflight_bytes,
                        "layer_pct": [100 * b.cache.present_bytes / b.size for b in blobs], "probes": len(probes)}
                return snap

            async def watch() -> None:
                window = collections.deque([(t_fill0, link.bytes_down)])
                while not done.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.25 if ui.console else 1.0)
                    ui.progress(snapshot(window))

            async def probe_one() -> None:
                during_files = files_busy.is_set()
                try:
                    _data, lat = await prober_nbd.read_timed(pick(), PROBE_BYTES)
                except NBDClientError as e:
                    probe_errors.append(str(e))
                    return
                probes.append(lat)
                (probes_with_files if during_files else probes_fill_only).append(lat)

            async def probe() -> None:
                # Open loop: one read every PROBE_PACE_S whether or not earlier ones came back,
                # so a stalled read does not hide the reads that would have queued behind it.
                outstanding: set[asyncio.Task] = set()
                try:
                    while not done.is_set():
                        if len(outstanding) < PROBE_MAX_OUTSTANDING:
                            t = asyncio.ensure_future(probe_one())
                            outstanding.add(t)
                            t.add_done_callback(outstanding.discard)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(done.wait(), PROBE_PACE_S)
                    if outstanding:  # normally all local by now; bounded in case the fill failed
                        await asyncio.wait(set(outstanding), timeout=PROBE_DRAIN_S)
                finally:
                    for t in outstanding:
                        t.cancel()

            ui.progress_start()
            watcher = asyncio.ensure_future(watch())
            prober = asyncio.ensure_future(probe())
            try:
                files = []
                for f in built.files:
                    r = await _read_file(nbd, f)
                    files.append(r)
                    ui.line(f"{'ok ' if r['ok'] else 'BAD'} {r['path']:<40} {r['size'] / MiB:7.2f} MiB  "
                            f"first byte {_ms(r['ttfb_s']):>8}  whole file {_ms(r['total_s']):>8}  ({r['layer']})")
                result["files"] = files
                files_busy.clear()
                ui.line("files done; random 4 KiB reads continue (one every 100 ms) until the fill completes")
                try:
                    await asyncio.wait_for(asyncio.gather(*(sched.wait_filled(b) for b in blobs)),
                                           opts.fill_timeout_s)
                except asyncio.TimeoutError:
                    raise DemoFailed(f"background fill did not finish within {opts.fill_timeout_s:.0f}s") from None
            finally:
                done.set()
                await asyncio.gather(watcher, prober, return_exceptions=True)
                ui.progress_stop()
            fill_s = time.monotonic() - t_fill0
            fetched = sched.stats.total_fetched
            result["open"] = {"seconds": open_s, "fetched_bytes": open_bytes}
            result["fill"] = {"seconds": fill_s, "blob_bytes": total_blob, "fetched_bytes": fetched,
                              "MBps": total_blob / fill_s / MB, "peak_inflight_requests": peak["requests"],
                              "peak_inflight_bytes": peak["bytes"],
                              "requests": {p.name: sched.stats.requests[p] for p in Priority}}
            result["foreground"] = {"n": len(probes), "p50_s": pct(probes, 50), "p90_s": pct(probes, 90),
                                    "with_files": {"n": len(probes_with_files), "p50_s": pct(probes_with_files, 50),
                                                   "p90_s": pct(probes_with_files, 90)},
                                    "fill_only": {"n": len(probes_fill_only), "p50_s": pct(probes_fill_only, 50),
                                                  "p90_s": pct(probes_fill_only, 90)},
                                    "max_s": max(probes, default=None), "errors": probe_errors[:10],
                                    "error_count": len(probe_errors),
                                    "registry_requests": sched.stats.requests[Priority.FOREGROUND]}
            ui.line(f"all layers fetched and verified in {fill_s:.1f}s "
                    f"({total_blob / fill_s / MB:.2f} MB/s, peak {peak['requests']} requests / "
                    f"{peak['bytes'] / MiB:.1f} MiB in flight)")

            layers = []
            for layer, b, d in zip(built.layers, blobs, dirs):
                commit = d / "overlaybd.commit"
                sha_ok = commit.exists() and ("sha256:" + await asyncio.to_thread(buildmod.sha256_file, commit)) == layer.digest
                layers.append({"digest": layer.digest, "size": layer.size, "complete": b.cache.complete,
                               "verified": bool(b.cache.verified), "commit_file": str(commit), "commit_sha256_ok": sha_ok})
            result["layers"] = layers

            ui.rule("6. bit-exact check of the whole export")
            sha, how = await _hash_export(sock, image.size)
            result["export_sha256"], result["hash_client"] = sha, how
            result["raw_sha256"] = built.raw2_sha256
            result["bit_exact"] = sha == built.raw2_sha256
            ui.line(f"sha256 over NBD ({how}) {sha[:16]}…  vs built raw disk {built.raw2_sha256[:16]}…  → "
                    f"{'identical' if result['bit_exact'] else 'DIFFERENT'}")
        # image, scheduler, NBD server closed here; the link and registry stay for the baseline

        ui.rule("7. upstream's pattern on the same link")
        base = await _baseline(opts, workdir, f"{repo_blob_url}/{built.layers[0].digest}", built.layers[0], gcfg)
        base["projected_fill_s"] = total_blob / (base["MBps"] * MB) if base["MBps"] > 0 else None
        result["upstream"] = base
        ui.line(f"one {base['chunk_bytes'] // 1024} KiB GET at a time: {base['bytes'] / MiB:.1f} MiB in "
                f"{base['seconds']:.1f}s = {base['MBps']:.2f} MB/s → whole image in "
                f"{base['projected_fill_s'] or float('nan'):.0f}s (projected)")
        result["link"]["bytes_delivered"] = link.bytes_down
    return result


# ------------------------------------------------------------------------------------ entry


def summarize(result: dict, ui: Reporter) -> None:
    fill, base, fg = result["fill"], result["upstream"], result["foreground"]
    speedup = (base["projected_fill_s"] / fill["seconds"]) if base.get("projected_fill_s") else None
    result["speedup"] = speedup
    rows = [
        ["fill time (both layers)", f"{fill['seconds']:.1f} s",
         f"{base['projected_fill_s']:.0f} s (projected)" if base.get("projected_fill_s") else "-"],
        ["fill throughput", f"{fill['MBps']:.2f} MB/s", f"{base['MBps']:.2f} MB/s"],
        ["link capacity used", f"{100 * fill['MBps'] * MB / (result['link']['rate_mbps'] * 1e6 / 8):.0f} %",
         f"{100 * base['MBps'] * MB / (result['link']['rate_mbps'] * 1e6 / 8):.0f} %"],
        ["speedup", f"{speedup:.1f}×" if speedup else "-", "1×"],
        ["4 KiB reads during fill p50 / p90", f"{_ms(fg['p50_s'])} / {_ms(fg['p90_s'])} (n={fg['n']})", "-"],
        ["  while files also load", f"{_ms(fg['with_files']['p50_s'])} / {_ms(fg['with_files']['p90_s'])} "
                                    f"(n={fg['with_files']['n']})", "-"],
        ["  fill only", f"{_ms(fg['fill_only']['p50_s'])} / {_ms(fg['fill_only']['p90_s'])} "
                        f"(n={fg['fill_only']['n']})", "-"],
        ["foreground registry GETs", str(fg["registry_requests"]), "-"],
        ["bytes fetched / blob bytes", f"{fill['fetched_bytes'] / fill['blob_bytes']:.2f}×", "-"],
    ]
    ui.table(f"summary — RTT {result['link']['rtt_ms']:.0f} ms, {result['link']['rate_mbps']:g} Mbit/s",
             ["", "tcmu-obd", "upstream-like"], rows)
    files_ok = all(f["ok"] for f in result["files"])
    layers_ok = all(x["verified"] and x["commit_sha256_ok"] for x in result["layers"])
    ui.line(f"files read over NBD match their sources: {'yes' if files_ok else 'NO'}; "
            f"layers complete + sha256-verified: {'yes' if layers_ok else 'NO'}; "
            f"whole export sha256 == built disk: {'yes' if result['bit_exact'] else 'NO'}")
    reads_ok = fg["error_count"] == 0
    if not reads_ok:
        ui.line(f"{fg['error_count']} small reads FAILED during the fill, e.g. {fg['errors'][0]}")
    result["checks"] = {"files": files_ok, "layers": layers_ok, "bit_exact": result["bit_exact"],
                        "foreground_reads": reads_ok}
    result["ok"] = all(result["checks"].values())


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def run_demo(opts: DemoOptions, ui: Reporter | None = None) -> dict:
    """Run the whole demo; returns the result dict (result["ok"]). Cleans up unless opts.keep.

    Raises DemoFailed / ObdError when a step cannot be done at all.
    """
    ui = ui or Reporter(opts.plain)
    if opts.keep is not None:
        workdir = Path(opts.keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            raise DemoFailed(f"--keep {workdir}: directory is not empty")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="tcmu-obd-demo-"))
    result: dict = {"ok": False, "workdir": str(workdir), "kept": opts.keep is not None}
    try:
        ui.rule("1. build a two-layer overlaybd image with tcmu-obd's own writer")
        t0 = time.monotonic()
        built = buildmod.build_image(workdir / "build", opts.size_mib, log=ui.line)
        result["build"] = {"seconds": time.monotonic() - t0, "disk_bytes": built.disk_size,
                           "data_bytes": built.data_bytes, "layer2_changed_bytes": built.changed_bytes,
                           "layers": [{"digest": x.digest, "size": x.size, "uuid": x.uuid} for x in built.layers]}
        result.update(asyncio.run(serve_and_read(opts, built, workdir, ui)))
        summarize(result, ui)
    except ObdError as e:
        result["error"] = str(e)
        raise
    except (OSError, aiohttp.ClientError) as e:  # a socket, file or tool the demo needs: one clear line, not a traceback
        result["error"] = f"{type(e).__name__}: {e}"
        raise DemoFailed(result["error"]) from e
    finally:
        if opts.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
            result["workdir_removed"] = not workdir.exists()
        if opts.json_path is not None:
            Path(opts.json_path).write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return result
