#!/usr/bin/env python3
"""Load benchmark: one daemon serving 8 devices at once, foreground reads against background fill.

    nice -n 10 .venv/bin/python -m bench.load_bench [--duration 240] [--devices 8] [--image-mib 24]
                                                    [--readers 2] [--rate 100] [--fill-mibps auto] [--out ...]

What it runs (the product's daemon model: one process, one scheduler and cache, many devices):

- Debian's real docker-registry (tcmu_obd.demo.registry), with one overlaybd image per device
  pushed to it: distinct blobs built from distinct raw disks, alternately a ZFile (lz4) and a
  plain LSMT layer, each with a layer `dir` so the background fill ends as overlaybd.commit.
- A server child process (`--serve-child`): one Scheduler over every image, download enabled
  with no delay and the fill paced (`--fill-mibps`, default: all blobs over the run's length, so
  the fill runs for the whole test), and one in-process NBDServer per device on a unix socket.
- In this process: `--readers` NBD connections per device issuing random 4 KiB-aligned 4 KiB
  reads, `--rate` per device in all (a Poisson stream; 0: back to back), and comparing every
  reply with the device's raw disk. A miss fetches its 256 KiB refill unit, so uniform reads
  cover a device quickly: the devices are large (256 MiB each, 2 GiB in all) and the rate
  moderate so that misses, fill and hits mix for the first minutes; per-window figures show
  the shift from misses to hits.

Reports (JSON, and a summary on stdout): errors (failed or wrong reads: must be 0), bytes
verified, reads/s, p50/p99/max foreground latency (request sent to reply header), the server's
RSS sampled every second (peak, first vs last third: does it grow; and the same less the ZFile
sources' decoded-block LRUs, which are bounded by design and fill up over a run), and the
fill's progress per window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1 << 20
PAGE = 4096


# ------------------------------------------------------------------------------ images
def make_raw(path: Path, mib: int, seed: int) -> None:
    """A raw disk whose every 4 KiB page is half noise, half zeros (ZFile-compressible, never
    all-zero, so each page is a mapped block and each read checks real bytes)."""
    r = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(b"".join(r.randbytes(2048) + bytes(2048) for _ in range(256)))


async def prepare(workdir: Path, registry, devices: int, image_mib: int) -> list[dict]:
    """Build, push and describe one image per device: [{raw, digest, size, config}]."""
    from tcmu_obd.tools.layer_tools import build_layer_from_raw

    out = []
    for i in range(devices):
        d = workdir / f"dev{i}"
        d.mkdir(parents=True, exist_ok=True)
        raw, blob = d / "disk.raw", d / "layer.blob"
        if not raw.exists():
            make_raw(raw, image_mib, seed=1000 + i)
        if not blob.exists():
            await asyncio.to_thread(build_layer_from_raw, raw, blob, algorithm="lz4" if i % 2 == 0 else None)
        digest = await registry.push(blob)
        layer_dir = d / "layer"
        layer_dir.mkdir(exist_ok=True)
        for stale in ("overlaybd.commit", ".download", ".download.map"):
            (layer_dir / stale).unlink(missing_ok=True)
        config = d / "config.v1.json"
        config.write_text(json.dumps({
            "repoBlobUrl": registry.repo_blob_url,
            "lowers": [{"digest": digest, "size": blob.stat().st_size, "dir": str(layer_dir)}],
            "resultFile": str(d / "result"),
        }))
        out.append({"raw": str(raw), "digest": digest, "size": blob.stat().st_size, "config": str(config),
                    "kind": "zfile-lz4" if i % 2 == 0 else "lsmt"})
    return out


# ------------------------------------------------------------------------------ server child
async def serve_child(spec_path: str) -> None:
    """Open every image over one Scheduler, serve each on its own NBD socket until SIGTERM,
    then write the scheduler's counters to spec["stats"]."""
    from tcmu_obd.config import load_global_config
    from tcmu_obd.frontends.nbd.server import NBDServer
    from tcmu_obd.image.stack import open_image
    from tcmu_obd.scheduler import Scheduler, SchedulerOptions

    spec = json.loads(Path(spec_path).read_text())
    gcfg = load_global_config(spec["global_config"])
    scheduler = await Scheduler.create(gcfg, SchedulerOptions(max_mbps=spec["fill_mibps"]))
    images, servers = [], []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        for dev in spec["devices"]:
            image = await open_image(dev["config"], gcfg, scheduler=scheduler, read_only=True)
            images.append(image)
            server = NBDServer(image, read_only=True)
            await server.serve_unix(dev["socket"])
            servers.append(server)
        print("ready", flush=True)
        zfiles = [layer.unwrapped.zfile for image in images for layer in image.lowers if layer.unwrapped.zfile]

        async def progress() -> None:
            # one line a second: what the memory is expected to hold (decoded-block LRUs)
            while True:
                blobs = scheduler.blobs()
                print(json.dumps({"lru": sum(z.cached_bytes for z in zfiles),
                                  "lru_bound": sum(z.cache_bytes for z in zfiles),
                                  "cached": sum(b.cache.present_bytes for b in blobs),
                                  "verified": sum(1 for b in blobs if b.cache.verified)}), flush=True)
                await asyncio.sleep(1.0)

        ticker = asyncio.create_task(progress())
        await stop.wait()
        ticker.cancel()
        blobs = scheduler.blobs()
        stats = {
            "fill_bytes": scheduler.stats.bytes_fetched[2],
            "foreground_bytes": scheduler.stats.bytes_fetched[0],
            "foreground_requests": scheduler.stats.requests[0],
            "fill_requests": scheduler.stats.requests[2],
            "failures": {int(k): v for k, v in scheduler.stats.failures.items()},
            "blobs_verified": sum(1 for b in blobs if b.cache.verified),
            "blobs": len(blobs),
            "cached_bytes": sum(b.cache.present_bytes for b in blobs),
            "total_bytes": sum(b.size for b in blobs),
            "nbd_errors": sum(s.stats["errors"] for s in servers),
            "nbd_requests": sum(s.stats["requests"] for s in servers),
        }
        Path(spec["stats"]).write_text(json.dumps(stats))
    finally:
        for s in servers:
            await s.aclose(grace=5)
        for image in images:
            await image.aclose()
        await scheduler.aclose()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------ clients
async def reader(sock: str, raw: mmap.mmap, size: int, until: float, rng: random.Random, out: dict,
                 interval: float) -> None:
    """Random 4 KiB reads until `until`: one every `interval` s on average (exponential gaps,
    so a device's reads arrive as a Poisson stream), or back to back when interval is 0."""
    from tcmu_obd.demo.nbdclient import NBDClient

    client = await NBDClient.connect_unix(sock)
    pages = size // PAGE
    due = time.monotonic()
    try:
        while time.monotonic() < until:
            if interval:
                due += rng.expovariate(1 / interval)
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            off = rng.randrange(pages) * PAGE
            try:
                data, latency = await client.read_timed(off, PAGE)
            except Exception as e:  # noqa: BLE001 — every failure is counted and reported
                out["errors"] += 1
                out["error_samples"].append(f"{sock} @{off}: {e}")
                await client.aclose()  # a failed read may have broken the connection: start afresh
                client = await NBDClient.connect_unix(sock)
                continue
            out["latencies"].append(latency)
            out["timeline"].append((time.monotonic(), latency))
            if data != raw[off:off + PAGE]:
                out["errors"] += 1
                out["error_samples"].append(f"{sock} @{off}: wrong bytes")
            else:
                out["bytes_verified"] += PAGE
                out["per_device"][sock] = out["per_device"].get(sock, 0) + 1
    finally:
        await client.aclose()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_load(workdir: Path, registry, *, devices: int = 8, image_mib: int = 256, duration: float = 180.0,
                   readers: int = 2, rate: float = 100.0, fill_mibps: float | None = None, window: float = 30.0,
                   log=print) -> dict:
    """`rate`: foreground reads/s per device (0: every reader back to back)."""
    """Run the whole scenario against a started registry; returns the results dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    devs = await prepare(workdir, registry, devices, image_mib)
    total = sum(d["size"] for d in devs)
    if fill_mibps is None:
        fill_mibps = max(0.25, total / MiB / duration)  # the fill lasts about as long as the run
    cache_dir = workdir / "cache"
    gconf = workdir / "overlaybd.json"
    gconf.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(cache_dir), "cacheSizeGB": 4},
        "download": {"enable": True, "delay": 0, "delayExtra": 0, "maxMBps": 0},
        "enableAudit": False,
    }))
    for i, d in enumerate(devs):
        d["socket"] = str(workdir / f"nbd{i}.sock")
    spec = workdir / "spec.json"
    stats_path = workdir / "server-stats.json"
    stats_path.unlink(missing_ok=True)
    spec.write_text(json.dumps({"global_config": str(gconf), "fill_mibps": fill_mibps, "devices": devs,
                                "stats": str(stats_path)}))
    errlog = open(workdir / "server.log", "w")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.load_bench", "--serve-child", str(spec),
                                                cwd=str(REPO), stdout=asyncio.subprocess.PIPE, stderr=errlog)
    raws, files = [], []
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if line.strip() != b"ready":
            raise RuntimeError(f"server child did not start: {line!r} (see {workdir / 'server.log'})")
        log(f"serving {devices} devices ({total / MiB:.0f} MiB of blobs), fill paced at {fill_mibps:.2f} MiB/s, "
            f"{readers} reader(s) per device for {duration:.0f} s")
        for d in devs:
            f = open(d["raw"], "rb")
            files.append(f)
            raws.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        out = {"errors": 0, "error_samples": [], "latencies": [], "timeline": [], "bytes_verified": 0,
               "per_device": {}}
        rss: list[tuple[float, int]] = []
        child: list[tuple[float, dict]] = []
        start = time.monotonic()
        until = start + duration

        async def sample_rss() -> None:
            while time.monotonic() < until:
                rss.append((round(time.monotonic() - start, 1), rss_bytes(proc.pid)))
                await asyncio.sleep(1.0)

        async def child_progress() -> None:
            while line := await proc.stdout.readline():
                child.append((time.monotonic() - start, json.loads(line)))

        progress_task = asyncio.create_task(child_progress())

        rng = random.Random(42)
        interval = readers / rate if rate > 0 else 0.0
        tasks = [asyncio.create_task(reader(d["socket"], raws[i], len(raws[i]), until,
                                            random.Random(rng.random()), out, interval))
                 for i, d in enumerate(devs) for _ in range(readers)]
        sampler = asyncio.create_task(sample_rss())
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await sampler
        progress_task.cancel()
        elapsed = time.monotonic() - start
        for r in results:
            if isinstance(r, BaseException):
                out["errors"] += 1
                out["error_samples"].append(f"reader died: {r!r}")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        errlog.close()
        for m in raws:
            m.close()
        for f in files:
            f.close()
    server = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    lat = sorted(out["latencies"])
    windows = []
    for w in range(max(1, int(elapsed // window))):  # whole windows (the last partial one is a few reads)
        lo, hi = start + w * window, start + (w + 1) * window
        ws = sorted(latency for t, latency in out["timeline"] if lo <= t < hi)
        last = [c for t, c in child if t < (w + 1) * window]
        last = last[-1] if last else {}
        windows.append({"from_s": w * window, "reads": len(ws), "p50_ms": round(percentile(ws, 0.5) * 1e3, 3),
                        "p99_ms": round(percentile(ws, 0.99) * 1e3, 3),
                        "rss_max_mib": round(max((v for t, v in rss if w * window <= t < (w + 1) * window),
                                                 default=0) / MiB, 1),
                        "lru_mib": round(last.get("lru", 0) / MiB, 1),
                        "cached_pct": round(100 * last.get("cached", 0) / total, 1),
                        "blobs_verified": last.get("verified", 0)})
    # RSS less the decoded-block LRUs (bounded by design): flat means nothing else accumulates
    net = []
    for t, v in rss:
        before = [c for ct, c in child if ct <= t]
        if before:
            net.append(v - before[-1]["lru"])
    third = max(1, len(rss) // 3)
    rss_values = [v for _, v in rss]
    return {
        "devices": devices,
        "readers_per_device": readers,
        "reads_per_s_per_device_target": rate,
        "image_mib": image_mib,
        "blob_bytes": total,
        "fill_mibps": round(fill_mibps, 3),
        "duration_s": round(elapsed, 1),
        "reads": len(lat),
        "reads_per_s": round(len(lat) / elapsed, 1),
        "errors": out["errors"],
        "error_samples": out["error_samples"][:10],
        "bytes_verified": out["bytes_verified"],
        "verified_reads_per_device": [out["per_device"].get(d["socket"], 0) for d in devs],
        "latency_ms": {
            "p50": round(percentile(lat, 0.50) * 1e3, 3),
            "p90": round(percentile(lat, 0.90) * 1e3, 3),
            "p99": round(percentile(lat, 0.99) * 1e3, 3),
            "max": round(lat[-1] * 1e3, 3) if lat else 0.0,
            "mean": round(statistics.fmean(lat) * 1e3, 3) if lat else 0.0,
        },
        "windows": windows,
        "rss": {
            "peak_mib": round(max(rss_values, default=0) / MiB, 1),
            "first_third_max_mib": round(max(rss_values[:third], default=0) / MiB, 1),
            "last_third_max_mib": round(max(rss_values[-third:], default=0) / MiB, 1),
            "samples": [(t, round(v / MiB, 1)) for t, v in rss],
            "zfile_lru_bound_mib": round(child[-1][1]["lru_bound"] / MiB, 1) if child else 0,
            "net_of_lru_first_third_max_mib": round(max(net[:max(1, len(net) // 3)], default=0) / MiB, 1),
            "net_of_lru_last_third_max_mib": round(max(net[-max(1, len(net) // 3):], default=0) / MiB, 1),
        },
        "server": server,
        "server_exit": proc.returncode,
    }


def summary(r: dict) -> str:
    s = r["server"]
    lines = [
        *(f"  [{w['from_s']:>4.0f} s..] reads={w['reads']} p50={w['p50_ms']} ms p99={w['p99_ms']} ms "
          f"rss={w['rss_max_mib']} MiB lru={w['lru_mib']} MiB cached={w['cached_pct']}% "
          f"verified={w['blobs_verified']}" for w in r["windows"]),
        f"devices={r['devices']} x {r['readers_per_device']} readers, {r['duration_s']} s, "
        f"{r['reads']} reads ({r['reads_per_s']}/s), errors={r['errors']}, "
        f"verified={r['bytes_verified'] / MiB:.1f} MiB",
        f"latency ms: p50={r['latency_ms']['p50']} p90={r['latency_ms']['p90']} p99={r['latency_ms']['p99']} "
        f"max={r['latency_ms']['max']}",
        f"server RSS MiB: peak={r['rss']['peak_mib']} first third max={r['rss']['first_third_max_mib']} "
        f"last third max={r['rss']['last_third_max_mib']}; less the ZFile LRUs (bound "
        f"{r['rss']['zfile_lru_bound_mib']}): first third max={r['rss']['net_of_lru_first_third_max_mib']} "
        f"last third max={r['rss']['net_of_lru_last_third_max_mib']}",
    ]
    if s:
        lines.append(f"fill: {s['fill_bytes'] / MiB:.1f} MiB filled, "
                     f"{s['blobs_verified']}/{s['blobs']} blobs verified, "
                     f"{s['cached_bytes'] / MiB:.1f}/{s['total_bytes'] / MiB:.1f} MiB cached; "
                     f"foreground fetched {s['foreground_bytes'] / MiB:.1f} MiB in {s['foreground_requests']} GETs")
    return "\n".join(lines)


async def main_async(args) -> int:
    from tcmu_obd.demo.registry import DockerRegistry

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="obd-load-"))
    registry = await DockerRegistry(workdir / "registry").start()
    try:
        r = await run_load(workdir, registry, devices=args.devices, image_mib=args.image_mib,
                           duration=args.duration, readers=args.readers, rate=args.rate, fill_mibps=args.fill_mibps,
                           window=args.window)
    finally:
        await registry.aclose()
    print(summary(r))
    Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if r["errors"] == 0 and r["server_exit"] == 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=240.0, help="seconds of load (default 240)")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--image-mib", type=int, default=256, help="raw size of each device (MiB)")
    ap.add_argument("--readers", type=int, default=2, help="NBD connections reading per device")
    ap.add_argument("--rate", type=float, default=100.0,
                    help="foreground 4 KiB reads/s per device, Poisson (0: back to back)")
    ap.add_argument("--fill-mibps", type=float, default=None,
                    help="background fill pace in MiB/s (default: all blobs over the run's duration)")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    ap.add_argument("--workdir", default=None, help="keep images, cache and logs here (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "bench" / "load-results.json"))
    ap.add_argument("--serve-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_child:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        asyncio.run(serve_child(args.serve_child))
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
