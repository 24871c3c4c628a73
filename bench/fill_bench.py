"""Fill benchmark: how fast does a layer blob come down a long, capped link?

    sudo .venv/bin/python -m bench.fill_bench            # full run, ~6-7 min
    sudo .venv/bin/python -m bench.fill_bench --quick    # small blobs, short phases

Everything runs through the userspace link emulator (bench/linkemu.py): Debian's
docker-registry in the registry namespace, every client in the client namespace, real kernel
TCP on both ends. Phases, in one run and on the same link (`--phases`):

  skopeo     `skopeo copy docker://REG/bench/fill-256m:v1 dir:...`: one stream per layer, the
             "pull the whole image ahead of time" reference (x reps).
  seq        upstream overlaybd's background download pattern: one 256 KiB range GET in flight
             at a time on one keep-alive connection (aiohttp), for a bounded time; the
             whole-blob time is extrapolated.
  seq-obd    the same pattern as `tcmu-obd fetch --mode upstream`, for the same time.
  seq-reno   (optional) `seq` with reno instead of BBR on the registry side.
  filler     `tcmu-obd fetch --global-config G CONFIG` with a fresh cache: our concurrent,
             adaptive filler, on the same 256 MiB blob (x reps).
  fg         cold 4 KiB reads at random offsets, one at a time, without and with a filler:
             through the scheduler in one process (RemoteBlobSource.read_into at FOREGROUND,
             the same scheduler filling the 1 GiB blob), and/or from an independent aiohttp
             client beside a `tcmu-obd fetch` process (`--fg-mode`).
  rss        `tcmu-obd fetch` of the 1 GiB blob with its VmRSS/RssAnon/RssFile sampled.

Throughput over time comes from the line's delivered-byte counter (registry → client),
sampled every 0.5 s. Output: bench/results/fill.json (full, with time series; git-ignored),
bench/fill-results.json (the numbers), bench/fill.png and a markdown table on stdout.

Experiments with the daemon's scheduler knobs (phases fg/sched filler): OBD_BENCH_SCHED_OPTS='{"fg_yield": 0.5,
"latency_probes": true}' (JSON, SchedulerOptions fields).

The helpers run inside the namespaces as `python -m bench.fill_bench _push|_seq|_fg|_fgsched|
_schedfill|_standin` (internal subcommands; each prints one JSON line).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.linkemu import LinkParams, LinkRig, add_param_args, params_from_args, set_pdeathsig, stop_process

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_PY = ROOT / ".venv" / "bin" / "python"
TCMU_OBD = ROOT / ".venv" / "bin" / "tcmu-obd"
REG_PORT = 5000
NGINX_PORT = 5001  # --blob-server nginx: the registry's blob files over sendfile (a diagnostic)
MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# overlaybd.json "download" for the filler: upstream's defaults (maxMBps 100 MiB/s is above the
# 50 MB/s cap), but no start delay.
DOWNLOAD_CONFIG = {"enable": True, "delay": 0, "delayExtra": 0, "maxMBps": 100, "tryCnt": 5, "blockSize": 262144}


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation; None for no data."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# =============================================================================================
# helpers that run inside a namespace (internal subcommands)


def blob_chunks(size: int, seed: int, chunk: int = 32 * MiB):
    """Deterministic incompressible bytes: the same (size, seed) always gives the same blob."""
    rng = random.Random(seed)
    done = 0
    while done < size:
        n = min(chunk, size - done)
        yield rng.randbytes(n)
        done += n


class Http:
    """Tiny blocking HTTP/1.1 client for the registry push (loopback inside the registry ns)."""

    def __init__(self, host: str, port: int):
        self.conn = http.client.HTTPConnection(host, port, timeout=120)

    def req(self, method: str, url: str, body=None, headers: dict | None = None):
        path = urllib.parse.urlsplit(url)
        target = path.path + (f"?{path.query}" if path.query else "")
        self.conn.request(method, target, body=body, headers=headers or {})
        r = self.conn.getresponse()
        data = r.read()
        return r, data


def _upload(h: Http, repo: str, chunks, expect_size: int) -> tuple[str, int]:
    r, _ = h.req("POST", f"/v2/{repo}/blobs/uploads/")
    if r.status != 202:
        raise RuntimeError(f"upload start: HTTP {r.status}")
    loc = r.getheader("Location")
    sha = hashlib.sha256()
    off = 0
    for c in chunks:
        sha.update(c)
        r, body = h.req("PATCH", loc, body=c, headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{off}-{off + len(c) - 1}",
            "Content-Length": str(len(c)),
        })
        if r.status != 202:
            raise RuntimeError(f"upload chunk at {off}: HTTP {r.status} {body[:200]!r}")
        loc = r.getheader("Location")
        off += len(c)
    assert off == expect_size
    digest = "sha256:" + sha.hexdigest()
    sep = "&" if "?" in loc else "?"
    r, body = h.req("PUT", f"{loc}{sep}digest={digest}", body=b"", headers={"Content-Length": "0"})
    if r.status != 201:
        raise RuntimeError(f"upload commit: HTTP {r.status} {body[:200]!r}")
    return digest, off


def wait_http(host: str, port: int, method: str, path: str, timeout: float = 30.0) -> Http:
    """A connection to a server that has just been started, once `method path` answers 200."""
    h = Http(host, port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            r, _ = h.req(method, path)
            if r.status == 200:
                return h
        except OSError:
            h = Http(host, port)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} did not answer {method} {path} with 200 within {timeout:.0f} s")
        time.sleep(0.2)


def push_image(host: str, port: int, repo: str, tag: str, size: int, seed: int) -> dict:
    """Push a one-layer OCI image whose layer is `size` deterministic random bytes; reuse it if
    the registry already has that tag with a layer of that size. Returns layer/config digests."""
    h = wait_http(host, port, "GET", "/v2/")
    r, body = h.req("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    if r.status == 200:
        m = json.loads(body)
        layer = m["layers"][0]
        r2, _ = h.req("HEAD", f"/v2/{repo}/blobs/{layer['digest']}")
        if layer["size"] == size and r2.status == 200 and m.get("annotations", {}).get("bench.seed") == str(seed):
            return {"repo": repo, "tag": tag, "digest": layer["digest"], "size": size, "pushed": False}
    t0 = time.monotonic()
    digest, n = _upload(h, repo, blob_chunks(size, seed), size)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest]},
    }, separators=(",", ":")).encode()
    cdigest, _ = _upload(h, repo, [config], len(config))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest, "size": n}],
        "annotations": {"bench.seed": str(seed)},
    }, separators=(",", ":")).encode()
    r, body = h.req("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest, headers={"Content-Type": OCI_MANIFEST})
    if r.status != 201:
        raise RuntimeError(f"manifest put: HTTP {r.status} {body[:300]!r}")
    return {"repo": repo, "tag": tag, "digest": digest, "size": n, "pushed": True, "push_s": time.monotonic() - t0}


async def seq_pattern(url: str, size: int, chunk: int, seconds: float) -> dict:
    """Upstream bk_download: strictly sequential range GETs, one in flight, one connection."""
    import aiohttp

    lat: list[float] = []
    got = 0
    conn = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as s:
        t0 = time.monotonic()
        off = 0
        while off < size and time.monotonic() - t0 < seconds:
            end = min(off + chunk, size) - 1
            t1 = time.monotonic()
            async with s.get(url, headers={"Range": f"bytes={off}-{end}"}) as r:
                if r.status != 206:
                    raise RuntimeError(f"range GET: HTTP {r.status}")
                data = await r.read()
            lat.append(time.monotonic() - t1)
            if len(data) != end - off + 1:
                raise RuntimeError("short range response")
            got += len(data)
            off = end + 1
        elapsed = time.monotonic() - t0
    return {
        "bytes": got, "elapsed_s": elapsed, "requests": len(lat), "chunk": chunk,
        "MBps": got / elapsed / 1e6,
        "req_p50_ms": pct(lat, 50) * 1000, "req_p90_ms": pct(lat, 90) * 1000,
        "complete": off >= size,
        "extrapolated_whole_blob_s": size / (got / elapsed),
    }


async def fg_reads(url: str, size: int, count: int, seed: int, warm: int, until: str | None,
                   start_after: str | None) -> dict:
    """Cold 4 KiB random reads, one at a time, over one keep-alive connection (independent
    client: every read goes to the registry). Stops after `count` reads, or when the file
    `until` appears. Waits for the file `start_after` first."""
    import aiohttp

    rng = random.Random(seed)
    lat: list[float] = []
    stamps: list[float] = []
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as s:
        async def one() -> float:
            off = rng.randrange(size // 4096) * 4096
            t = time.monotonic()
            async with s.get(url, headers={"Range": f"bytes={off}-{off + 4095}"}) as r:
                data = await r.read()
                if r.status != 206 or len(data) != 4096:
                    raise RuntimeError(f"fg read: HTTP {r.status}, {len(data)} bytes")
            return time.monotonic() - t

        for _ in range(warm):  # open and warm the connection; not counted
            await one()
        if start_after:
            while not os.path.exists(start_after):
                await asyncio.sleep(0.05)
        while len(lat) < count:
            if until and os.path.exists(until):
                break
            lat.append(await one())
            stamps.append(time.time())
    return {"n": len(lat), "lat_ms": [x * 1000 for x in lat], "wall": stamps}


class SchedulerRig:
    """The scheduler built as `tcmu-obd fetch` builds it (RegistryClient + CacheStore +
    Scheduler); `aclose()` closes all three in fetch's order."""

    def __init__(self, gcfg, mode: str | None = None):
        from tcmu_obd.cache import CacheStore
        from tcmu_obd.remote.registry import RegistryClient
        from tcmu_obd.scheduler import Scheduler, SchedulerOptions

        opts = SchedulerOptions(mode=mode or "adaptive", max_mbps=0.0,
                                **json.loads(os.environ.get("OBD_BENCH_SCHED_OPTS", "{}")))
        self.client = RegistryClient(gcfg, max_connections=max(64, opts.max_concurrency + 8))
        self.store = CacheStore.from_config(gcfg)
        self.sched = Scheduler(self.client, self.store, gcfg, opts)

    async def aclose(self) -> None:
        await self.sched.aclose()
        await self.store.aclose()
        await self.client.aclose()


async def fg_sched(gpath: str, cpath: str, count: int, seed: int, warm: int, fill: bool,
                   fill_warm_s: float, max_s: float) -> dict:
    """Cold 4 KiB reads through the daemon's own read path (RemoteBlobSource → scheduler at
    FOREGROUND), one at a time, optionally while the scheduler's filler fills the same blob.

    Each offset is drawn uniformly from pages not yet in the cache when the read is issued (a
    page being fetched by the filler counts as cold: the read then waits for that transfer,
    as a device read would)."""
    from tcmu_obd.config import load_global_config, load_image_config
    from tcmu_obd.scheduler import Priority

    gcfg = load_global_config(gpath)
    icfg = load_image_config(cpath, gcfg)
    rig = SchedulerRig(gcfg)
    sched = rig.sched
    lat: list[float] = []
    stamps: list[float] = []
    info: dict = {}
    try:
        src = await sched.open_blob(icfg, icfg.lowers[0])
        rng = random.Random(seed)
        pages = src.size // 4096
        buf = memoryview(bytearray(4096))

        def cold_offset() -> int | None:
            for _ in range(10000):
                off = rng.randrange(pages) * 4096
                if not src.cache.is_present(off, off + 4096):
                    return off
            return None

        async def one() -> float | None:
            off = cold_offset()
            if off is None:
                return None
            t = time.monotonic()
            await src.read_into(off, buf)
            return time.monotonic() - t

        for _ in range(warm):  # connection set-up; not counted
            await one()
        if fill:
            sched.start_fill(src, delay=0)
            t0 = time.monotonic()
            b0 = sched.stats.bytes_fetched[Priority.FILL]
            await asyncio.sleep(fill_warm_s)  # let the window open up first
            info["fill_MBps_warmup"] = (sched.stats.bytes_fetched[Priority.FILL] - b0) / (time.monotonic() - t0) / 1e6
        t_start = time.monotonic()
        f_start = sched.stats.bytes_fetched[Priority.FILL]
        while len(lat) < count and time.monotonic() - t_start < max_s:
            if fill and src.cache.verified:
                break
            x = await one()
            if x is None:
                break
            lat.append(x)
            stamps.append(time.time())
        el = time.monotonic() - t_start
        if fill:
            info["fill_MBps_during"] = (sched.stats.bytes_fetched[Priority.FILL] - f_start) / el / 1e6
            info["fill_complete_at_end"] = bool(src.cache.verified)
            sched.stop_fill(src)
        info["window"] = repr(getattr(sched, "window", None))
        await src.aclose()
    finally:
        await rig.aclose()
    return {"n": len(lat), "lat_ms": [x * 1000 for x in lat], "wall": stamps, **info}


async def sched_fill(gpath: str, cpath: str, mode: str | None) -> dict:
    """Interim stand-in for `tcmu-obd fetch`: the real scheduler's filler, driven directly
    (open the lower, start_fill(delay=0), wait_filled)."""
    from tcmu_obd.config import load_global_config, load_image_config

    gcfg = load_global_config(gpath)
    icfg = load_image_config(cpath, gcfg)
    t0 = time.monotonic()
    rig = SchedulerRig(gcfg, mode)
    sched = rig.sched
    try:
        src = await sched.open_blob(icfg, icfg.lowers[0])
        sched.start_fill(src, delay=0)
        await sched.wait_filled(src)
        window = repr(getattr(sched, "window", None))
        await src.aclose()
    finally:
        await rig.aclose()
    return {"elapsed_s": time.monotonic() - t0, "window": window}


async def standin_fill(url: str, size: int, out: str, conns: int, chunk: int) -> dict:
    """Development stand-in for `tcmu-obd fetch`: N connections pulling fixed chunks into a file."""
    import aiohttp

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    offsets = list(range(0, size, chunk))
    offsets.reverse()
    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as s:
        async def worker():
            while offsets:
                off = offsets.pop()
                end = min(off + chunk, size) - 1
                async with s.get(url, headers={"Range": f"bytes={off}-{end}"}) as r:
                    data = await r.read()
                os.pwrite(fd, data, off)

        await asyncio.gather(*(worker() for _ in range(conns)))
    os.close(fd)
    return {"elapsed_s": time.monotonic() - t0}


def internal_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fill_bench (internal)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("_push")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=REG_PORT)
    p.add_argument("--repo", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("_seq")
    s.add_argument("--url", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--chunk", type=int, default=256 * 1024)
    s.add_argument("--seconds", type=float, default=60)
    f = sub.add_parser("_fg")
    f.add_argument("--url", required=True)
    f.add_argument("--size", type=int, required=True)
    f.add_argument("--count", type=int, default=60)
    f.add_argument("--seed", type=int, default=7)
    f.add_argument("--warm", type=int, default=2)
    f.add_argument("--until")
    f.add_argument("--start-after")
    fs = sub.add_parser("_fgsched")
    fs.add_argument("--global-config", required=True)
    fs.add_argument("--config", required=True)
    fs.add_argument("--count", type=int, default=60)
    fs.add_argument("--seed", type=int, default=7)
    fs.add_argument("--warm", type=int, default=2)
    fs.add_argument("--fill", action="store_true")
    fs.add_argument("--fill-warm-s", type=float, default=3.0)
    fs.add_argument("--max-s", type=float, default=60.0)
    sf = sub.add_parser("_schedfill")
    sf.add_argument("--global-config", required=True)
    sf.add_argument("--config", required=True)
    sf.add_argument("--mode")
    st = sub.add_parser("_standin")
    st.add_argument("--url", required=True)
    st.add_argument("--size", type=int, required=True)
    st.add_argument("--out", required=True)
    st.add_argument("--conns", type=int, default=16)
    st.add_argument("--chunk", type=int, default=4 * MiB)
    wt = sub.add_parser("_wait")
    wt.add_argument("--port", type=int, required=True)
    wt.add_argument("--method", default="GET")
    wt.add_argument("--path", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "_wait":
        wait_http("127.0.0.1", a.port, a.method, a.path)
        res = {"ok": True}
    elif a.cmd == "_push":
        res = push_image(a.host, a.port, a.repo, a.tag, a.size, a.seed)
    elif a.cmd == "_seq":
        res = asyncio.run(seq_pattern(a.url, a.size, a.chunk, a.seconds))
    elif a.cmd == "_fg":
        res = asyncio.run(fg_reads(a.url, a.size, a.count, a.seed, a.warm, a.until, a.start_after))
    elif a.cmd == "_schedfill":
        res = asyncio.run(sched_fill(a.global_config, a.config, a.mode))
    elif a.cmd == "_fgsched":
        res = asyncio.run(fg_sched(a.global_config, a.config, a.count, a.seed, a.warm, a.fill, a.fill_warm_s, a.max_s))
    else:
        res = asyncio.run(standin_fill(a.url, a.size, a.out, a.conns, a.chunk))
    print(json.dumps(res), flush=True)
    return 0


# =============================================================================================
# the driver (root namespace)


class Sampler:
    """Every `interval` s: line counters, machine CPU busy, CPU of watched pids, RSS of one pid."""

    def __init__(self, rig: LinkRig, interval: float = 0.5):
        self.rig = rig
        self.interval = interval
        self.samples: list[dict] = []
        self.watch: dict[str, int] = {}  # name -> pid whose CPU seconds are recorded
        self.rss_pid: int | None = None
        self.rss_samples: list[tuple[float, int]] = []
        self.rss_peak_kb = 0
        self.anon_peak_kb = 0
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _loop(self) -> None:
        next_rss = 0.0
        next_sample = 0.0
        while not self._stop.is_set():
            t = self.now()
            if t >= next_sample:
                self.samples.append(self._sample(t))
                next_sample = t + self.interval
            if self.rss_pid is not None and t >= next_rss:
                kb = read_rss_kb(self.rss_pid)
                if kb and "VmRSS" in kb:
                    self.rss_samples.append((t, kb["VmRSS"], kb.get("RssAnon", 0), kb.get("RssFile", 0)))
                    self.rss_peak_kb = max(self.rss_peak_kb, kb.get("VmHWM", 0))
                    self.anon_peak_kb = max(self.anon_peak_kb, kb.get("RssAnon", 0))
                next_rss = t + 0.1
            self._stop.wait(0.05)

    def _sample(self, t: float) -> dict:
        st = self.rig.stats()
        s2c, c2s = st.get("s2c", {}), st.get("c2s", {})
        return {
            "t": round(t, 3),
            "line_t": st.get("t"),  # when the line wrote these counters (its own clock)
            "s2c_bytes": s2c.get("delivered_bytes", 0),
            "c2s_bytes": c2s.get("delivered_bytes", 0),
            "drops": s2c.get("dropped_frames", 0) + c2s.get("dropped_frames", 0),
            "cpu": cpu_times(),
            "pids": {k: proc_cpu_s(p) for k, p in self.watch.items()},
        }


PR_SET_THP_DISABLE = 41


def _registry_preexec() -> None:
    """In the registry's child before exec: the line's parent-death signal, and no transparent
    huge pages (kept across exec): each fault of one would zero 2 MiB on the shared cores."""
    set_pdeathsig()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


def registry_label(a: argparse.Namespace) -> str:
    parts = [f"GOGC={a.registry_gogc}"]
    if a.registry_godebug:
        parts.append(f"GODEBUG={a.registry_godebug}")
    parts.append("THP off" if a.registry_thp == "off" else "THP as the host")
    return "docker-registry 2.8 (Debian), " + ", ".join(parts)


def wait_rusage(proc: subprocess.Popen, timeout: float) -> dict:
    """Reap `proc` with wait4 (killing it after `timeout`): CPU seconds and peak RSS. The exit
    is seen when it happens (a pidfd becomes readable), not at the next poll: phases are timed
    from the parent, and a 20 ms poll added ~10 ms to every one."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        proc.kill()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "user_s": round(ru.ru_utime, 2),
            "sys_s": round(ru.ru_stime, 2), "maxrss_KiB": ru.ru_maxrss}


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return None


RSS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as {field: value}; empty once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def read_rss_kb(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM (peak), RssAnon, RssFile, RssShmem in KiB. RssFile counts pages of mapped
    files (e.g. an mmap'd cache file): reclaimable page cache, not heap."""
    d = proc_status(pid)
    try:
        return {k: int(d[k].split()[0]) for k in RSS_KEYS if k in d} if d else None
    except ValueError:
        return None


class Bench:
    def __init__(self, a: argparse.Namespace, params: LinkParams):
        self.a = a
        self.p = params
        self.work = Path(a.workdir)
        self.scratch = self.work / f"run-{os.getpid()}"
        self.results: dict = {"phases": {}}
        self.phase_marks: list[dict] = []
        self.rig: LinkRig | None = None
        self.sampler: Sampler | None = None
        self.registry: subprocess.Popen | None = None
        self.images: dict[str, dict] = {}

    # -- plumbing
    def reg_url(self) -> str:
        return f"http://{self.p.server_addr}:{REG_PORT}"

    def blob_url(self, img: dict) -> str:
        return f"{self.reg_url()}/v2/{img['repo']}/blobs/{img['digest']}"

    def fill_blob_base(self, img: dict) -> str:
        """repoBlobUrl of the phases that run tcmu-obd (filler, fg, rss): the registry, or nginx
        with --blob-server nginx."""
        port = NGINX_PORT if self.a.blob_server == "nginx" else REG_PORT
        return f"http://{self.p.server_addr}:{port}/v2/{img['repo']}/blobs"

    def helper(self, ns_side: str, args: list[str], timeout: float | None = None) -> dict:
        run = self.rig.run_reg if ns_side == "reg" else self.rig.run_cli
        r = run([str(VENV_PY), "-m", "bench.fill_bench", *args], check=False, timeout=timeout,
                cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            raise RuntimeError(f"helper {args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def quiesce(self, idle_s: float = 0.6, max_s: float = 10.0) -> None:
        """Wait until the line has carried nothing for `idle_s` (a previous phase's tail, e.g.
        a response in flight at SIGINT, must not count towards the next)."""
        end = time.monotonic() + max_s
        last = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
        quiet_since = time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.1)
            cur = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
            if cur != last:
                last, quiet_since = cur, time.monotonic()
            elif time.monotonic() - quiet_since >= idle_s:
                return

    @contextlib.contextmanager
    def phase(self, name: str):
        s = self.sampler
        self.quiesce()
        n = len(s.samples)
        while len(s.samples) == n:  # start right after a sample: the phase's base counter is fresh
            time.sleep(0.01)
        mark = {"name": name, "t0": s.now()}
        st0 = self.rig.stats()
        log(f"phase {name} ...")
        try:
            yield mark
        finally:
            mark["t1"] = s.now()
            st1 = self.rig.stats()

            def grew(direction: str, counter: str) -> int:
                return st1.get(direction, {}).get(counter, 0) - st0.get(direction, {}).get(counter, 0)

            mark["line_drops"] = grew("s2c", "dropped_frames") + grew("c2s", "dropped_frames")
            mark["s2c_bytes"] = grew("s2c", "delivered_bytes")
            # the line's CPU goes per frame, and a frame carries ~2 segments at 128 flows
            mark["line_frames"] = {d: grew(d, "delivered_frames") for d in ("s2c", "c2s")}
            self.phase_marks.append(mark)
            log(f"phase {name} done in {mark['t1'] - mark['t0']:.1f} s")

    # -- setup
    def start_nginx(self, img: dict) -> subprocess.Popen:
        """nginx in the registry's namespace serving the registry's own blob files (sendfile, one
        process): --blob-server nginx, to see what the registry's CPU per GET costs a fill on
        the cores it shares with the client and the line. Only blob GETs and HEADs; skopeo, the
        pushes and the aiohttp-only phases (seq, the independent reader) stay on the registry.
        Ready once a HEAD of `img`'s blob answers 200 from inside the namespace."""
        if not os.access(self.a.nginx_bin, os.X_OK):
            raise RuntimeError(f"--blob-server nginx: no nginx at {self.a.nginx_bin} (apt install nginx-light)")
        blobs = self.work / "registry" / "docker" / "registry" / "v2" / "blobs" / "sha256"
        cfg = self.scratch / "nginx.conf"
        cfg.write_text(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {self.scratch / 'nginx.pid'};\nerror_log {self.scratch / 'nginx-error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
            "  keepalive_requests 100000;\n  keepalive_timeout 75s;\n"
            f"  client_body_temp_path {self.scratch};\n"
            f"  server {{\n    listen {NGINX_PORT};\n"
            '    location ~ "^/v2/.+/blobs/sha256:(([0-9a-f]{2})[0-9a-f]{62})$" {\n'
            f"      alias {blobs}/$2/$1/data;\n      default_type application/octet-stream;\n    }}\n  }}\n}}\n")
        proc = self.rig.popen_reg([self.a.nginx_bin, "-c", str(cfg), "-p", str(self.scratch), "-e",
                                   str(self.scratch / "nginx-error.log")],
                                  stdout=open(self.scratch / "nginx.log", "w"), stderr=subprocess.STDOUT,
                                  preexec_fn=set_pdeathsig)
        try:
            self.helper("reg", ["_wait", "--port", str(NGINX_PORT), "--method", "HEAD",
                                "--path", f"/v2/{img['repo']}/blobs/{img['digest']}"], timeout=60)
        except RuntimeError as e:
            said = [p.read_text()[-1000:] for p in (self.scratch / "nginx-error.log", self.scratch / "nginx.log") if p.exists()]
            raise RuntimeError(f"nginx did not start: {' '.join(said) or e}") from e
        return proc

    def start_registry(self) -> None:
        regdir = self.work / "registry"
        regdir.mkdir(parents=True, exist_ok=True)
        cfg = self.work / "registry.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {regdir}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 0.0.0.0:{REG_PORT}\n  secret: tcmu-obd-bench-only\n"
        )
        env = {**os.environ, "GOGC": str(self.a.registry_gogc)}
        env.pop("GODEBUG", None)  # the label says what the registry runs with, nothing inherited
        if self.a.registry_godebug:
            env["GODEBUG"] = self.a.registry_godebug
        kw = {}
        if self.a.registry_thp == "off":
            kw["preexec_fn"] = _registry_preexec
        self.registry = self.rig.popen_reg(
            [self.a.registry_bin, "serve", str(cfg)], env=env,
            stdout=open(self.scratch / "registry.log", "w"), stderr=subprocess.STDOUT, **kw,
        )

    def push(self, name: str, size: int) -> dict:
        img = self.helper("reg", ["_push", "--repo", f"bench/{name}", "--tag", "v1", "--size", str(size), "--seed", str(self.a.seed)])
        log(f"image bench/{name}:v1 {'pushed' if img['pushed'] else 'already present'}: {img['digest'][:19]}… {size} bytes")
        self.images[name] = img
        return img

    # -- phases
    def run_skopeo(self, img: dict, rep: int) -> dict:
        out = self.scratch / f"skopeo-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        with self.phase(f"skopeo#{rep}") as mark:
            t0 = time.monotonic()
            r = self.rig.run_cli(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                  f"docker://{self.p.server_addr}:{REG_PORT}/{img['repo']}:{img['tag']}", f"dir:{out}"],
                                 check=False)
            wall = time.monotonic() - t0
        layer = out / img["digest"].split(":", 1)[1]
        if r.returncode != 0 or not layer.exists() or layer.stat().st_size != img["size"]:
            raise RuntimeError(f"skopeo failed: {r.stderr[-1500:]}")
        shutil.rmtree(out, ignore_errors=True)
        return {"wall_s": wall, "MBps": img["size"] / wall / 1e6, **self.steady(mark, img["size"])}

    def run_seq(self, img: dict, server_cc: str | None = None) -> dict:
        """`server_cc`: run with this congestion control on the registry side (new connections
        only), then restore the declared one."""
        from bench import netns

        name = f"seq-{server_cc}" if server_cc else "seq"
        if server_cc:
            netns.sysctl(self.p.reg_ns, "net.ipv4.tcp_congestion_control", server_cc)
        try:
            with self.phase(name):
                res = self.helper("cli", ["_seq", "--url", self.blob_url(img), "--size", str(img["size"]),
                                          "--seconds", str(self.a.seq_seconds)])
        finally:
            if server_cc:
                netns.sysctl(self.p.reg_ns, "net.ipv4.tcp_congestion_control", self.p.congestion)
        res["server_cc"] = server_cc or self.p.congestion
        res["note"] = (f"measured for {res['elapsed_s']:.0f} s ({res['bytes'] / MiB:.1f} MiB of {img['size'] / MiB:.0f} MiB); "
                       f"whole-blob time extrapolated: {res['extrapolated_whole_blob_s']:.0f} s")
        return res

    def run_seq_obd(self, img: dict) -> dict:
        """`tcmu-obd fetch --mode upstream` (our re-creation of upstream's bk_download pattern) for
        `seq_seconds`, then SIGINT; rate from the line's counters."""
        with self.phase("seq-obd"):
            proc, d = self.start_filler(img, "seqobd", ["--mode", "upstream"])
            time.sleep(2.0)  # process start; excluded below
            b0 = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
            t0 = time.monotonic()
            try:
                proc.wait(self.a.seq_seconds)
            except subprocess.TimeoutExpired:
                pass
            el = time.monotonic() - t0
            b1 = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
            complete = proc.poll() is not None
            if not complete:
                proc.send_signal(signal.SIGINT)
            ru = wait_rusage(proc, 30)
            with contextlib.suppress(ValueError):
                self.rig.children.remove(proc)
        rate = (b1 - b0) / el
        res = {"MBps": rate / 1e6, "measured_s": el, "bytes_on_line": b1 - b0, "complete": complete,
               "exit": proc.returncode, **ru, **self.fetch_report(d),
               "note": f"line bytes over {el:.0f} s after a 2 s start-up allowance; whole blob extrapolated: {img['size'] / rate:.0f} s"}
        shutil.rmtree(d, ignore_errors=True)
        return res

    def fetch_config(self, img: dict, tag: str) -> tuple[Path, Path, Path]:
        d = self.scratch / f"fetch-{tag}"
        shutil.rmtree(d, ignore_errors=True)
        (d / "cache").mkdir(parents=True)
        (d / "layer").mkdir()
        g = d / "overlaybd.json"
        g.write_text(json.dumps({
            "logConfig": {"logLevel": 1, "logPath": str(d / "overlaybd.log")},
            "cacheConfig": {"cacheType": "file", "cacheDir": str(d / "cache"), "cacheSizeGB": 8},
            "credentialConfig": {"mode": "file", "path": str(d / "cred.json")},
            "download": DOWNLOAD_CONFIG,
            "enableAudit": False,
        }, indent=2))
        c = d / "config.v1.json"
        c.write_text(json.dumps({
            "repoBlobUrl": self.fill_blob_base(img),
            "lowers": [{"digest": img["digest"], "size": img["size"], "dir": str(d / "layer")}],
            "resultFile": str(d / "result"),
        }, indent=2))
        return g, c, d

    def filler_argv(self, img: dict, tag: str, extra: list[str] | None = None) -> tuple[list[str], Path]:
        g, c, d = self.fetch_config(img, tag)
        if self.a.filler == "fetch" or extra is not None:
            return [str(TCMU_OBD), *self.a.fetch_args, "fetch", "--global-config", str(g), "--progress", "plain",
                    "--interval", "1", "--stats-json", str(d / "fetch-stats.json"),
                    *(extra if extra is not None else self.a.fetch_opts), str(c)], d
        if self.a.filler == "sched":
            return [str(VENV_PY), "-m", "bench.fill_bench", "_schedfill", "--global-config", str(g), "--config", str(c)], d
        return [str(VENV_PY), "-m", "bench.fill_bench", "_standin", "--url", self.blob_url(img),
                "--size", str(img["size"]), "--out", str(d / "layer" / "blob"),
                "--conns", str(self.a.standin_conns), "--chunk", str(self.a.standin_chunk_kib * 1024)], d

    def start_filler(self, img: dict, tag: str, extra: list[str] | None = None) -> tuple[subprocess.Popen, Path]:
        argv, d = self.filler_argv(img, tag, extra)
        proc = self.rig.popen_cli(argv, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  stdout=open(d / "stdout.log", "w"), stderr=open(d / "stderr.log", "w"))
        return proc, d

    def finish_filler(self, proc: subprocess.Popen, d: Path, timeout: float) -> dict:
        """Wait for the filler; returns its CPU seconds and peak RSS from wait4() (the Popen pid
        is the filler itself: `ip netns exec` execs it)."""
        ru = wait_rusage(proc, timeout)
        with contextlib.suppress(ValueError):
            self.rig.children.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"filler exited {proc.returncode}: {(d / 'stderr.log').read_text()[-2000:]}")
        return {**ru, **self.fetch_report(d)}

    @staticmethod
    def fetch_report(d: Path) -> dict:
        """What `tcmu-obd fetch` said about itself: the final `fetch: done ...` line and --stats-json."""
        out: dict = {}
        with contextlib.suppress(OSError):
            lines = (d / "stdout.log").read_text().splitlines()
            last = next((ln for ln in reversed(lines) if ln.startswith("fetch: done") or ln.startswith("fetch: failed")), None)
            if last:
                kv = dict(x.split("=", 1) for x in last.split()[2:] if "=" in x)
                out["fetch_said"] = {k: float(v) for k, v in kv.items()}
            out["fetch_progress"] = [ln for ln in lines if "MB/s" in ln][-60:]
        with contextlib.suppress(OSError, ValueError):
            out["fetch_stats"] = json.loads((d / "fetch-stats.json").read_text())
        return out

    def verify_fill(self, img: dict, d: Path) -> bool | None:
        """sha256 of the fetched layer if we can find it (fetch writes <dir>/overlaybd.commit or a
        cache file); None when no candidate exists."""
        if not self.a.verify:
            return None
        want = img["digest"].split(":", 1)[1]
        for cand in [*(d / "layer").glob("*"), *(d / "cache").rglob("*")]:
            if cand.is_file() and cand.stat().st_size == img["size"]:
                h = hashlib.sha256()
                with open(cand, "rb") as f:
                    while b := f.read(8 * MiB):
                        h.update(b)
                return h.hexdigest() == want
        return None

    def run_filler(self, img: dict, rep: int) -> dict:
        with self.phase(f"filler#{rep}") as mark:
            t0 = time.monotonic()
            proc, d = self.start_filler(img, f"fill{rep}")
            self.sampler.watch["filler"] = proc.pid
            ru = self.finish_filler(proc, d, timeout=600)
            wall = time.monotonic() - t0
        self.sampler.watch.pop("filler", None)
        res = {"wall_s": wall, "MBps": img["size"] / wall / 1e6, "verified": self.verify_fill(img, d), **ru,
               "stdout_tail": (d / "stdout.log").read_text()[-1500:], "stderr_tail": (d / "stderr.log").read_text()[-1500:],
               **self.steady(mark, img["size"])}
        shutil.rmtree(d, ignore_errors=True)
        return res

    def run_fg_sched(self, big: dict, with_filler: bool) -> dict:
        """Foreground reads through the scheduler in one process (the daemon's read path),
        with or without the same scheduler filling the blob."""
        name = "fg-fill" if with_filler else "fg-idle"
        g, c, d = self.fetch_config(big, name)
        args = ["_fgsched", "--global-config", str(g), "--config", str(c), "--count", str(self.a.fg_reads),
                "--seed", str(self.a.seed + 11), "--max-s", str(self.a.fg_max_s)]
        if with_filler:
            args.append("--fill")
        with self.phase(name):
            res = self.helper("cli", args, timeout=self.a.fg_max_s + 120)
        shutil.rmtree(d, ignore_errors=True)
        res["mode"] = "scheduler: RemoteBlobSource.read_into (FOREGROUND) in one process" + (
            ", the same scheduler filling the blob" if with_filler else "")
        return self._lat_stats(res)

    def run_fg_indep(self, img: dict, with_filler: bool, big: dict) -> dict:
        """Foreground reads from an independent client (own connection, no cache) while the
        filler runs as a separate process: the link-level cost of the filler's traffic."""
        name = "fg-fill-indep" if with_filler else "fg-idle-indep"
        url = self.blob_url(img)
        args = ["_fg", "--url", url, "--size", str(img["size"]), "--count", str(self.a.fg_reads), "--seed", str(self.a.seed + 11)]
        with self.phase(name):
            if not with_filler:
                res = self.helper("cli", args)
            else:
                flag_start = self.scratch / "fg-start"
                flag_stop = self.scratch / "fg-stop"
                for f in (flag_start, flag_stop):
                    f.unlink(missing_ok=True)
                proc, d = self.start_filler(big, "fgfill")
                fg = self.rig.popen_cli([str(VENV_PY), "-m", "bench.fill_bench", *args, "--until", str(flag_stop),
                                         "--start-after", str(flag_start)],
                                        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                # let the filler reach full speed before sampling latency
                self.wait_rate(0.5 * self.p.rate_MBps * 1e6, timeout=15, proc=proc)
                flag_start.touch()
                b0 = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
                ts0 = time.monotonic()
                try:
                    rc = proc.wait(600)
                except subprocess.TimeoutExpired:
                    stop_process(proc)
                    rc = -1
                el = time.monotonic() - ts0
                b1 = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
                with contextlib.suppress(ValueError):
                    self.rig.children.remove(proc)
                flag_stop.touch()
                out, err = fg.communicate(timeout=60)
                with contextlib.suppress(ValueError):
                    self.rig.children.remove(fg)
                if rc != 0 or fg.returncode != 0:
                    raise RuntimeError(f"fg-fill failed: filler {rc} {(d / 'stderr.log').read_text()[-1000:]} / fg {fg.returncode} {err[-1000:]}")
                res = json.loads(out.strip().splitlines()[-1])
                res["fill_MBps_during"] = (b1 - b0) / el / 1e6
                shutil.rmtree(d, ignore_errors=True)
        res["mode"] = "independent client (aiohttp, one connection, every read to the registry) beside the filler process"
        return self._lat_stats(res)

    @staticmethod
    def _lat_stats(res: dict) -> dict:
        lat = res["lat_ms"]
        res.update({"p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
                    "max_ms": max(lat) if lat else None})
        return res

    def wait_rate(self, rate: float, timeout: float, proc: subprocess.Popen) -> None:
        """Return once the line delivers >= `rate` B/s over 0.5 s (or after `timeout`)."""
        end = time.monotonic() + timeout
        last = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.5)
            cur = self.rig.stats().get("s2c", {}).get("delivered_bytes", 0)
            if (cur - last) / 0.5 >= rate:
                return
            last = cur

    def run_rss(self, img: dict) -> dict:
        with self.phase("rss") as mark:
            t0 = time.monotonic()
            proc, d = self.start_filler(img, "rss")
            self.sampler.rss_samples = []
            self.sampler.rss_peak_kb = 0
            self.sampler.anon_peak_kb = 0
            self.sampler.rss_pid = proc.pid
            self.sampler.watch["filler"] = proc.pid
            ru = self.finish_filler(proc, d, timeout=900)
            wall = time.monotonic() - t0
            self.sampler.rss_pid = None
            self.sampler.watch.pop("filler", None)
        rss = self.sampler.rss_samples
        res = {
            "blob_bytes": img["size"], "wall_s": wall, "MBps": img["size"] / wall / 1e6,
            **ru,
            "rss_peak_MiB": max(self.sampler.rss_peak_kb, ru["maxrss_KiB"]) / 1024,
            "rss_max_sampled_MiB": max((x[1] for x in rss), default=0) / 1024,
            "anon_peak_sampled_MiB": self.sampler.anon_peak_kb / 1024,
            "file_max_sampled_MiB": max((x[3] for x in rss), default=0) / 1024,
            "rss_at_10pct_MiB": self._rss_at(rss, mark, 0.1), "rss_at_90pct_MiB": self._rss_at(rss, mark, 0.9),
            "rss_series": [(round(x[0] - mark["t0"], 2), x[1], x[2], x[3]) for x in rss],
            **self.steady(mark, img["size"]),
        }
        shutil.rmtree(d, ignore_errors=True)
        return res

    @staticmethod
    def _rss_at(rss, mark, frac) -> float | None:
        if not rss:
            return None
        t = mark["t0"] + (mark["t1"] - mark["t0"]) * frac
        return min(rss, key=lambda s: abs(s[0] - t))[1] / 1024

    # -- analysis
    def series(self, mark: dict) -> list[tuple[float, float]]:
        """(t since phase start, MB/s over the preceding sample interval) for a phase."""
        pts = [s for s in self.sampler.samples if mark["t0"] - 0.5 <= s["t"] <= mark.get("t1", 1e18) + 0.5]
        out = []
        for a, b in zip(pts, pts[1:]):
            # rate over the line's own timestamps of the two counter snapshots (the sampler's
            # read times jitter by up to the line's 0.1 s publishing period)
            dt = (b["line_t"] - a["line_t"]) if a.get("line_t") is not None and b.get("line_t") is not None else 0
            if dt <= 0:
                dt = b["t"] - a["t"]
            out.append((round(b["t"] - mark["t0"], 2), (b["s2c_bytes"] - a["s2c_bytes"]) / dt / 1e6))
        return out

    def steady(self, mark: dict, size: int) -> dict:
        """mid50: rate between 25 % and 75 % of the phase's delivered bytes (sampler resolution)."""
        pts = [s for s in self.sampler.samples if mark["t0"] - 0.5 <= s["t"] <= mark["t1"] + 0.5]
        if len(pts) < 3:
            return {"mid50_MBps": None}
        base = pts[0]["s2c_bytes"]
        tot = pts[-1]["s2c_bytes"] - base

        def t_at(frac):
            for a, b in zip(pts, pts[1:]):
                if b["s2c_bytes"] - base >= frac * tot:
                    span = b["s2c_bytes"] - a["s2c_bytes"]
                    x = (frac * tot - (a["s2c_bytes"] - base)) / span if span else 0
                    return a["t"] + x * (b["t"] - a["t"])
            return pts[-1]["t"]

        t25, t75 = t_at(0.25), t_at(0.75)
        t_first = t_at(0.001)  # ~first byte (0.5 s sampling, interpolated)
        return {"mid50_MBps": 0.5 * tot / (t75 - t25) / 1e6 if t75 > t25 else None,
                "first_byte_after_s": round(t_first - mark["t0"], 2),
                "from_first_byte_MBps": size / (mark["t1"] - t_first) / 1e6 if mark["t1"] > t_first else None}

    def busy(self, mark: dict) -> dict:
        pts = [s for s in self.sampler.samples if mark["t0"] <= s["t"] <= mark["t1"] + 0.5]
        if len(pts) < 2:
            return {}
        (b0, t0), (b1, t1) = pts[0]["cpu"], pts[-1]["cpu"]
        out = {"machine_busy_pct_of_2_cores": round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else None}
        for k in sorted({k for p in pts for k in p["pids"]}):
            v0 = next((p["pids"].get(k) for p in pts if p["pids"].get(k) is not None), None)
            v1 = next((p["pids"].get(k) for p in reversed(pts) if p["pids"].get(k) is not None), None)
            if v0 is not None and v1 is not None:
                out[f"{k}_cpu_s"] = round(v1 - v0, 2)
        return out

    # -- the run
    def remove_stale_scratch(self) -> None:
        """Scratch dirs of earlier runs that were killed with SIGKILL."""
        for d in self.work.glob("run-*"):
            pid = d.name[4:]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(d, ignore_errors=True)

    def run(self) -> dict:
        a = self.a
        self.remove_stale_scratch()
        self.scratch.mkdir(parents=True, exist_ok=True)
        with LinkRig(self.p) as rig:
            self.rig = rig
            self.results["link"] = rig.info
            self.start_registry()
            small = self.push(f"fill-{a.blob_mib}m", a.blob_mib * MiB)
            big = self.push(f"fill-{a.big_mib}m", a.big_mib * MiB)
            nginx = self.start_nginx(small) if a.blob_server == "nginx" else None
            self.sampler = Sampler(rig)
            self.sampler.watch["registry"] = self.registry.pid
            if nginx is not None:
                self.sampler.watch["nginx"] = nginx.pid
            self.sampler.watch["linkemu"] = rig.proc.pid
            self.sampler.start()
            tun0 = rig.tun_stats()
            retrans0 = self.retrans()
            registry_thp = proc_status(self.registry.pid).get("THP_enabled")
            ph = self.results["phases"]
            try:
                if "skopeo" in a.phases:
                    ph["skopeo"] = [self.run_skopeo(small, i) for i in range(a.reps)]
                if "seq" in a.phases:
                    ph["seq"] = self.run_seq(small)
                if "seq-obd" in a.phases:
                    ph["seq_obd"] = self.run_seq_obd(small)
                if "seq-reno" in a.phases:
                    ph["seq_reno"] = self.run_seq(small, "reno")
                if "filler" in a.phases:
                    ph["filler"] = [self.run_filler(small, i) for i in range(a.reps)]
                if "fg" in a.phases:
                    if a.fg_mode in ("sched", "both"):
                        ph["fg_idle"] = self.run_fg_sched(big, False)
                        ph["fg_fill"] = self.run_fg_sched(big, True)
                    if a.fg_mode in ("independent", "both"):
                        sfx = "_indep" if a.fg_mode == "both" else ""
                        ph["fg_idle" + sfx] = self.run_fg_indep(small, False, big)
                        ph["fg_fill" + sfx] = self.run_fg_indep(small, True, big)
                if "rss" in a.phases:
                    ph["rss"] = self.run_rss(big)
            finally:
                self.sampler.stop()
                tun1, line = rig.tun_stats(), rig.stats()
                self.results["validity"] = {
                    "tun_tx_dropped": {k: tun1[k]["tx_dropped"] - tun0[k]["tx_dropped"] for k in tun0},
                    "line_drops_total": sum(line.get(d, {}).get("dropped_frames", 0) for d in ("s2c", "c2s")),
                    "registry_TcpRetransSegs": self.retrans() - retrans0,
                    "registry_THP_enabled": registry_thp,  # "0" when --registry-thp off took effect
                }
                self.results["marks"] = [{**m, **self.busy(m)} for m in self.phase_marks]
                self.results["series"] = {m["name"]: self.series(m) for m in self.phase_marks}
                if nginx is not None:
                    stop_process(nginx)
                stop_process(self.registry)
        return self.results

    def retrans(self) -> int:
        from bench import netns

        return netns.nstat(self.p.reg_ns, "TcpRetransSegs").get("TcpRetransSegs", 0)


# =============================================================================================
# summary, table, plot


def summarise(res: dict, a: argparse.Namespace, params: LinkParams) -> dict:
    ph = res["phases"]
    cap = params.rate_MBps
    s: dict = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "link": {"rtt_ms": params.rtt_ms, "cap_MBps": cap, "queue_bytes": params.queue_bytes,
                 "server_tcp_wmem": params.server_wmem,
                 "client_tcp_rmem": res["link"]["sysctl"]["client"]["net.ipv4.tcp_rmem"],
                 "congestion_control": params.congestion, "cap_counts_per_segment_headers": params.wire_headers,
                 "registry": registry_label(a), "fill_blob_server": a.blob_server},
        "blob_bytes": a.blob_mib * MiB, "big_blob_bytes": a.big_mib * MiB,
        "filler": a.filler, "fetch_opts": " ".join(a.fetch_opts), "filler_download_config": DOWNLOAD_CONFIG, "validity": res.get("validity"),
    }

    def med(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    if "skopeo" in ph:
        s["skopeo_MBps"] = med(ph["skopeo"], "MBps")
        s["skopeo_runs_MBps"] = [round(r["MBps"], 2) for r in ph["skopeo"]]
        s["skopeo_from_first_byte_MBps"] = med(ph["skopeo"], "from_first_byte_MBps")
    if "seq" in ph:
        s["seq_MBps"] = ph["seq"]["MBps"]
        s["seq_note"] = ph["seq"]["note"]
        s["seq_req_p50_ms"] = ph["seq"]["req_p50_ms"]
    if "seq_obd" in ph:
        s["seq_obd_MBps"] = ph["seq_obd"]["MBps"]
        s["seq_obd_note"] = ph["seq_obd"]["note"]
    if "seq_reno" in ph:
        s["seq_reno_MBps"] = ph["seq_reno"]["MBps"]
        s["seq_reno_req_p50_ms"] = ph["seq_reno"]["req_p50_ms"]
    if "filler" in ph:
        s["filler_MBps"] = med(ph["filler"], "MBps")
        s["filler_runs_MBps"] = [round(r["MBps"], 2) for r in ph["filler"]]
        s["filler_runs_wall_s"] = [round(r["wall_s"], 2) for r in ph["filler"]]
        s["filler_mid50_MBps"] = med(ph["filler"], "mid50_MBps")
        s["filler_from_first_byte_MBps"] = med(ph["filler"], "from_first_byte_MBps")
        s["filler_first_byte_after_s"] = med(ph["filler"], "first_byte_after_s")
        s["filler_verified"] = [r["verified"] for r in ph["filler"]]
        s["filler_cpu_s"] = [r.get("cpu_s") for r in ph["filler"]]
        s["filler_maxrss_MiB"] = [round(r["maxrss_KiB"] / 1024, 1) for r in ph["filler"] if r.get("maxrss_KiB")]
        own = [r["fetch_said"]["seconds"] for r in ph["filler"] if r.get("fetch_said", {}).get("seconds")]
        if own:
            s["filler_own_seconds"] = own
            s["filler_own_MBps"] = statistics.median(a.blob_mib * MiB / x / 1e6 for x in own)
        # physics: connect + request round trips, then the whole blob at the payload ceiling
        payload_cap = cap * 1e6 * (1448 / 1500 if params.wire_headers else 1.0)
        bound = 2 * params.rtt_ms / 1000 + a.blob_mib * MiB / payload_cap
        s["ideal_bound"] = {"payload_ceiling_MBps": payload_cap / 1e6, "min_wall_s": bound,
                            "max_MBps": a.blob_mib * MiB / bound / 1e6,
                            "note": "2 RTT (connect, request) + blob / payload ceiling; ignores slow start"}
    for sfx in ("", "_indep"):
        if "fg_idle" + sfx not in ph:
            continue
        for k in ("fg_idle" + sfx, "fg_fill" + sfx):
            s[f"{k}_p50_ms"] = ph[k]["p50_ms"]
            s[f"{k}_p90_ms"] = ph[k]["p90_ms"]
            s[f"{k}_n"] = ph[k]["n"]
        s["fg_mode" + sfx] = ph["fg_fill" + sfx]["mode"]
        s["fg_fill" + sfx + "_filler_MBps_during"] = ph["fg_fill" + sfx].get("fill_MBps_during")
    if "rss" in ph:
        r = ph["rss"]
        s["rss"] = {k: r.get(k) for k in ("blob_bytes", "wall_s", "MBps", "rss_peak_MiB", "anon_peak_sampled_MiB",
                                          "file_max_sampled_MiB", "rss_at_10pct_MiB", "rss_at_90pct_MiB", "cpu_s")}
    if "filler" in ph:
        marks = {m["name"]: m for m in res.get("marks", [])}
        per_req = []
        for i, r in enumerate(ph["filler"]):
            reqs = r.get("fetch_stats", {}).get("client", {}).get("requests")
            cpu = marks.get(f"filler#{i}", {}).get("registry_cpu_s")
            if reqs and cpu is not None:
                per_req.append(round(1000 * cpu / reqs, 2))
        s["filler_registry_cpu_ms_per_request"] = per_req
        s["filler_requests"] = [r.get("fetch_stats", {}).get("client", {}).get("requests") for r in ph["filler"]]
    s["machine_busy"] = {m["name"]: m.get("machine_busy_pct_of_2_cores") for m in res.get("marks", [])}
    s["cpu_s"] = {m["name"]: {k: v for k, v in m.items() if k.endswith("_cpu_s")} for m in res.get("marks", [])}
    # targets
    t: dict = {}
    if s.get("filler_MBps"):
        t["filler >= 0.80 x cap"] = {"value": s["filler_MBps"] / cap, "target": 0.80, "met": s["filler_MBps"] >= 0.80 * cap}
        if s.get("filler_own_MBps"):
            v = s["filler_own_MBps"] / cap
            t["(fetch's own timer, no process start-up) filler >= 0.80 x cap"] = {"value": v, "target": 0.80, "met": v >= 0.80}
        if s.get("skopeo_MBps"):
            x = s["filler_MBps"] / s["skopeo_MBps"]
            t["filler >= 3.3 x skopeo"] = {"value": x, "target": 3.3, "met": x >= 3.3}
        if s.get("seq_MBps"):
            x = s["filler_MBps"] / s["seq_MBps"]
            t["filler >= 40 x sequential"] = {"value": x, "target": 40, "met": x >= 40}
    if s.get("fg_idle_p90_ms") and s.get("fg_fill_p90_ms"):
        x = s["fg_fill_p90_ms"] / s["fg_idle_p90_ms"]
        t["fg p90 with filler <= 1.5 x without"] = {"value": x, "target": 1.5, "met": x <= 1.5}
        if s.get("fg_fill_filler_MBps_during") is not None:
            v = s["fg_fill_filler_MBps_during"]
            t["... while that filler fills >= 35 MB/s"] = {"value": v, "target": 35, "met": v >= 35}
    if s.get("fg_idle_indep_p90_ms") and s.get("fg_fill_indep_p90_ms"):
        x = s["fg_fill_indep_p90_ms"] / s["fg_idle_indep_p90_ms"]
        t["(cross-check) independent-client p90 with filler <= 1.5 x without"] = {"value": x, "target": 1.5, "met": x <= 1.5}
    if "rss" in s:
        t[f"RSS bounded while filling {a.big_mib} MiB"] = {"value": s["rss"]["rss_peak_MiB"], "target": f"<= {a.rss_bound_mib:.0f} MiB",
                                                "met": s["rss"]["rss_peak_MiB"] <= a.rss_bound_mib}
    s["targets"] = t
    return s


def markdown(s: dict) -> str:
    L = s["link"]
    cap = L["cap_MBps"]

    def f(x, nd=1):
        return "–" if x is None else f"{x:.{nd}f}"

    lines = [
        f"Link: RTT {L['rtt_ms']:.0f} ms, cap {cap:.0f} MB/s (IP bytes incl. per-segment headers: {L['cap_counts_per_segment_headers']}), "
        f"queue {L['queue_bytes'] / 1e6:.0f} MB drop-tail, server tcp_wmem `{L['server_tcp_wmem']}`, client tcp_rmem `{L['client_tcp_rmem']}`, "
        f"{L['congestion_control']}; {L['registry']}; blob {s['blob_bytes'] / MiB:.0f} MiB.",
        "",
        "| method | MB/s | % of cap | filler speed-up | notes |",
        "|---|---|---|---|---|",
    ]
    fm = s.get("filler_MBps")
    if s.get("seq_MBps") is not None:
        lines.append(f"| upstream-like sequential 256 KiB | {f(s['seq_MBps'], 2)} | {f(100 * s['seq_MBps'] / cap)} % | "
                     f"{f(fm / s['seq_MBps'] if fm else None)}× | {s['seq_note']}; p50 {f(s['seq_req_p50_ms'], 0)} ms/request |")
    if s.get("seq_obd_MBps") is not None:
        lines.append(f"| `tcmu-obd fetch --mode upstream` (same pattern, our code) | {f(s['seq_obd_MBps'], 2)} | "
                     f"{f(100 * s['seq_obd_MBps'] / cap)} % | {f(fm / s['seq_obd_MBps'] if fm else None)}× | {s['seq_obd_note']} |")
    if s.get("seq_reno_MBps") is not None:
        lines.append(f"| same, registry-side CC reno | {f(s['seq_reno_MBps'], 2)} | {f(100 * s['seq_reno_MBps'] / cap)} % | "
                     f"{f(fm / s['seq_reno_MBps'] if fm else None)}× | p50 {f(s['seq_reno_req_p50_ms'], 0)} ms/request |")
    if s.get("skopeo_MBps") is not None:
        lines.append(f"| `skopeo copy` (one stream) | {f(s['skopeo_MBps'])} | {f(100 * s['skopeo_MBps'] / cap)} % | "
                     f"{f(fm / s['skopeo_MBps'] if fm else None, 2)}× | median of {s['skopeo_runs_MBps']} |")
    if fm is not None:
        if s.get("filler_own_MBps"):
            om = s["filler_own_MBps"]
            lines.append(f"| tcmu-obd filler, fetch's own timer (no process start-up) | {f(om)} | {f(100 * om / cap)} % | – | "
                         f"seconds {s['filler_own_seconds']} |")
        lines.append(f"| **tcmu-obd filler** ({s['filler']}) | **{f(fm)}** | **{f(100 * fm / cap)} %** | 1× | "
                     f"median of {s['filler_runs_MBps']} (wall incl. process start; first byte after {f(s.get('filler_first_byte_after_s'))} s); "
                     f"from first byte {f(s.get('filler_from_first_byte_MBps'))}, mid50 {f(s.get('filler_mid50_MBps'))} MB/s |")
    for sfx in ("", "_indep"):
        if s.get(f"fg_idle{sfx}_p90_ms") is None:
            continue
        lines += ["", f"Cold 4 KiB reads, {s['fg_mode' + sfx]}:", "",
                  "| cold 4 KiB reads | n | p50 ms | p90 ms |", "|---|---|---|---|",
                  f"| no filler | {s[f'fg_idle{sfx}_n']} | {f(s[f'fg_idle{sfx}_p50_ms'], 0)} | {f(s[f'fg_idle{sfx}_p90_ms'], 0)} |",
                  f"| filler running ({f(s.get(f'fg_fill{sfx}_filler_MBps_during'))} MB/s) | {s[f'fg_fill{sfx}_n']} | "
                  f"{f(s[f'fg_fill{sfx}_p50_ms'], 0)} | {f(s[f'fg_fill{sfx}_p90_ms'], 0)} |"]
    if s.get("ideal_bound"):
        b = s["ideal_bound"]
        lines += ["", f"Physics bound for this blob: payload ceiling {f(b['payload_ceiling_MBps'])} MB/s; "
                      f"2 RTT + blob/ceiling = {f(b['min_wall_s'], 2)} s = at most {f(b['max_MBps'])} MB/s wall-clock (ignoring slow start)."]
    if "rss" in s:
        r = s["rss"]
        lines += ["", f"RSS of the fetch process while filling {r['blob_bytes'] / MiB:.0f} MiB: peak VmHWM {f(r['rss_peak_MiB'])} MiB "
                      f"(anonymous peak {f(r['anon_peak_sampled_MiB'])} MiB, mapped-file max {f(r['file_max_sampled_MiB'])} MiB; "
                      f"VmRSS at 10 %: {f(r['rss_at_10pct_MiB'])} MiB, at 90 %: {f(r['rss_at_90pct_MiB'])} MiB); fill {f(r['MBps'])} MB/s. "
                      f"Peak RSS of the {s['blob_bytes'] / MiB:.0f} MiB fills: {s.get('filler_maxrss_MiB')} MiB."]
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for k, v in s["targets"].items():
        val = v["value"]
        lines.append(f"| {k} | {f(val, 2) if isinstance(val, float) else val} | {v['target']} | {'yes' if v['met'] else '**no**'} |")
    lines += ["", f"Machine busy % (of 2 cores) per phase: {s['machine_busy']}"]
    if s.get("code"):
        c = s["code"]
        lines += ["", f"tcmu_obd code: {c['before']['sha256']} (newest file {c['before']['newest_mtime']})"
                      + (f"; **changed during the run** to {c['after']['sha256']} ({c['after']['newest_mtime']})" if c["changed_during_run"] else "")]
    return "\n".join(lines)


def plot(res: dict, s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    ph = res["phases"]

    def median_rep(key: str) -> int:
        rows = ph.get(key, [])
        order = sorted(range(len(rows)), key=lambda i: rows[i]["wall_s"])
        return order[len(order) // 2] if order else 0

    curves = [
        (f"skopeo#{median_rep('skopeo')}", "skopeo copy (median run)"),
        ("seq", "sequential 256 KiB (aiohttp)"),
        ("seq-obd", "fetch --mode upstream"),
        ("seq-reno", "sequential, registry CC reno"),
        (f"filler#{median_rep('filler')}", f"tcmu-obd fetch, {s['blob_bytes'] / MiB:.0f} MiB (median run)"),
        ("rss", f"tcmu-obd fetch, {s['big_blob_bytes'] / MiB:.0f} MiB"),
    ]
    xmax = 0.0
    for name, label in curves:
        pts = res["series"].get(name)
        if not pts:
            continue
        if name.startswith("seq"):
            pts = [p for p in pts if p[0] <= 40]
        xmax = max(xmax, pts[-1][0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1.2)
    ax.axhline(s["link"]["cap_MBps"], color="k", ls="--", lw=0.8, label="cap")
    if s.get("ideal_bound"):
        ax.axhline(s["ideal_bound"]["payload_ceiling_MBps"], color="grey", ls=":", lw=0.8, label="payload ceiling")
    ax.set_xlabel("s since phase start")
    ax.set_ylabel("MB/s delivered (registry → client, 0.5 s bins)")
    ax.set_title(f"Throughput, RTT {s['link']['rtt_ms']:.0f} ms, cap {s['link']['cap_MBps']:.0f} MB/s")
    ax.set_ylim(0, s["link"]["cap_MBps"] * 1.35)
    ax.legend(fontsize=6.5, loc="upper right", ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, label in (("fg_idle", "no filler"), ("fg_fill", "filler running"),
                       ("fg_idle_indep", "independent client, no filler"), ("fg_fill_indep", "independent client, filler running")):
        lat = sorted(res["phases"].get(key, {}).get("lat_ms", []))
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=f"{label} (n={len(lat)})", drawstyle="steps-post")
    ax.axhline(0.9, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("cold 4 KiB read latency, ms")
    ax.set_ylabel("CDF")
    ax.set_title("Foreground read latency")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[2]
    rss = res["phases"].get("rss", {}).get("rss_series", [])
    if rss:
        ax.plot([p[0] for p in rss], [p[1] / 1024 for p in rss], label="VmRSS")
        ax.plot([p[0] for p in rss], [p[2] / 1024 for p in rss], label="RssAnon")
        ax.plot([p[0] for p in rss], [p[3] / 1024 for p in rss], label="RssFile")
        ax.legend(fontsize=8)
    ax.set_xlabel("s since fetch start")
    ax.set_ylabel("VmRSS, MiB")
    ax.set_title(f"fetch RSS while filling {s['big_blob_bytes'] / MiB:.0f} MiB")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# =============================================================================================


def code_fingerprint() -> dict:
    """sha256 over tcmu_obd/**/*.py and the newest mtime: which build was measured. Other
    engineers edit the tree while benchmarks run; a change during a run is flagged."""
    h = hashlib.sha256()
    newest = 0.0
    for f in sorted((ROOT / "tcmu_obd").rglob("*.py")):
        with contextlib.suppress(OSError):
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
            newest = max(newest, f.stat().st_mtime)
    return {"sha256": h.hexdigest()[:16], "newest_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest))}


def update_readme(path: Path, s: dict, table: str) -> None:
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        log(f"{path}: no results markers; not updated")
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    block = f"{begin}\nRun of {s['when']} ({s['runtime_s']:.0f} s, filler `{s['filler']}` {s['fetch_opts']}):\n\n{table}\n{end}"
    path.write_text(head + block + tail)


def fetch_available() -> bool:
    if not (ROOT / "tcmu_obd" / "tools" / "fetch.py").exists() or not TCMU_OBD.exists():
        return False
    r = subprocess.run([str(TCMU_OBD), "fetch", "--help"], capture_output=True, text=True)
    return r.returncode == 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        return internal_main(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.fill_bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_param_args(ap)
    ap.add_argument("--blob-mib", type=int, default=256)
    ap.add_argument("--big-mib", type=int, default=1024, help="blob for the RSS and fg-with-filler phases")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of skopeo and filler")
    ap.add_argument("--seq-seconds", type=float, default=60)
    ap.add_argument("--fg-reads", type=int, default=60)
    ap.add_argument("--fg-max-s", type=float, default=45.0, help="time limit of each foreground-latency phase")
    ap.add_argument("--fg-mode", choices=("auto", "sched", "independent", "both"), default="auto",  # auto: both if the scheduler exists
                    help="foreground reads through the scheduler (in-process, default when it exists), "
                         "from an independent client beside the filler process, or both")
    ap.add_argument("--phases", default="skopeo,seq,seq-obd,filler,fg,rss",
                    help="comma list of skopeo, seq, seq-obd (`tcmu-obd fetch --mode upstream`), seq-reno (optional: "
                         "sequential with reno on the registry side), filler, fg, rss")
    ap.add_argument("--filler", choices=("auto", "fetch", "sched", "standin"), default="auto",
                    help="fetch: `tcmu-obd fetch` (auto when it exists); sched: the scheduler's filler driven "
                         "directly (interim); standin: 16 x 4 MiB aiohttp (development)")
    ap.add_argument("--fetch-args", default="", help="extra global args for tcmu-obd (e.g. -v)")
    ap.add_argument("--fetch-opts", default="", help="extra `fetch` options for the filler phases, e.g. "
                    "'--mode fixed --concurrency 16' (recorded in the output)")
    ap.add_argument("--standin-conns", type=int, default=16, help="standin filler: connections")
    ap.add_argument("--standin-chunk-kib", type=int, default=4096, help="standin filler: bytes per range GET")
    ap.add_argument("--registry-bin", default=shutil.which("docker-registry") or "/usr/bin/docker-registry")
    ap.add_argument("--registry-gogc", type=int, default=400)
    ap.add_argument("--registry-godebug", default="madvdontneed=0",
                    help="GODEBUG of the registry ('' = none); the default keeps the heap it frees mapped "
                         "(MADV_FREE), so reusing it does not fault in fresh zeroed pages")
    ap.add_argument("--registry-thp", choices=("off", "host"), default="off",
                    help="off: transparent huge pages disabled for the registry (prctl); host: as the host "
                         "has them. Both defaults keep the registry's page zeroing off the 2 cores the "
                         "client and the line share (bench/README.md)")
    ap.add_argument("--blob-server", choices=("registry", "nginx"), default="registry",
                    help="nginx (a diagnostic): the phases that run tcmu-obd (filler, fg, rss) read the "
                         "blobs from nginx serving the registry's own files with sendfile, to measure what "
                         "the registry's CPU per GET costs them on the 2 shared cores; skopeo, seq and the "
                         "independent reader stay on the registry")
    ap.add_argument("--nginx-bin", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--rss-bound-mib", type=float, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--workdir", default="/var/tmp/obd-bench", help="registry storage (kept between runs) and scratch")
    ap.add_argument("--out", default=str(BENCH / "results" / "fill.json"))
    ap.add_argument("--summary-out", default=str(BENCH / "fill-results.json"))
    ap.add_argument("--plot-out", default=str(BENCH / "fill.png"))
    ap.add_argument("--update-readme", action="store_true",
                    help="also replace the results block of bench/README.md with this run's table")
    ap.add_argument("--quick", action="store_true", help="64/128 MiB blobs, 1 rep, 15 s seq, 20 reads; writes results/quick.*")
    if "--quick" in argv:  # smaller defaults; explicit options still win
        ap.set_defaults(blob_mib=64, big_mib=128, reps=1, seq_seconds=15, fg_reads=20, fg_max_s=15,
                        out=str(BENCH / "results" / "quick.json"),
                        summary_out=str(BENCH / "results" / "quick-summary.json"),
                        plot_out=str(BENCH / "results" / "quick.png"))
    a = ap.parse_args(argv)
    a.phases = set(a.phases.split(","))
    a.fetch_args = a.fetch_args.split()
    a.fetch_opts = a.fetch_opts.split()
    if a.filler == "auto":
        a.filler = "fetch" if fetch_available() else ("sched" if (ROOT / "tcmu_obd" / "scheduler").exists() else "standin")
    if a.fg_mode == "auto":
        a.fg_mode = "both" if (ROOT / "tcmu_obd" / "scheduler").exists() else "independent"
    if a.filler != "fetch":
        log(f"WARNING: not measuring `tcmu-obd fetch` but the {a.filler!r} stand-in")
    if os.geteuid() != 0:
        print("fill_bench: needs root", file=sys.stderr)
        return 2
    # Measure the program as an installed package runs: from its compiled bytecode (pip compiles
    # it at install; an editable checkout with PYTHONDONTWRITEBYTECODE would recompile every
    # module at every start, ~0.1 s of each fetch).
    compileall.compile_dir(str(ROOT / "tcmu_obd"), quiet=1)
    params = params_from_args(a)
    bench = Bench(a, params)
    code_before = code_fingerprint()
    t0 = time.monotonic()
    try:
        res = bench.run()
    finally:
        shutil.rmtree(bench.scratch, ignore_errors=True)
    res["runtime_s"] = time.monotonic() - t0
    s = summarise(res, a, params)
    s["runtime_s"] = round(res["runtime_s"], 1)
    code_after = code_fingerprint()
    s["code"] = {"before": code_before, "after": code_after, "changed_during_run": code_before != code_after}
    if s["code"]["changed_during_run"]:
        log("WARNING: tcmu_obd changed while the benchmark ran; phases may have measured different builds")
    res["summary"] = s
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    Path(a.summary_out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.summary_out).write_text(json.dumps(s, indent=2, default=str) + "\n")
    try:
        plot(res, s, Path(a.plot_out))
    except ImportError:
        log("matplotlib missing: no plot (pip install matplotlib into .venv)")
    table = markdown(s)
    print(table)
    if a.update_readme:
        update_readme(BENCH / "README.md", s, table)
    log(f"total {res['runtime_s']:.0f} s; wrote {a.out}, {a.summary_out}, {a.plot_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
