"""Chaos benchmark: `tcmu-obd fetch` through the fault proxy, one fault class per phase, with
realistic durations (stalls past the client's default 30 s read timeout, the registry away for
60 s), then everything at once with a kill -9 in the middle.

    .venv/bin/python -m bench.chaos                 # all phases, ~4 min
    .venv/bin/python -m bench.chaos --quick         # 16 MiB blob, 3 s outage, 5 s stalls
    .venv/bin/python -m bench.chaos --phases baseline,down

Debian's docker-registry runs locally (tests/support/registry.py) behind the project's fault
proxy (tests/support/faultproxy.py), which counts every body byte it sends. Each phase fetches
a fresh copy of the blob (a ZFile layer with per-block CRCs unless the phase says "plain") into
an empty cache with the real CLI in a subprocess, default options, over a paced 25 MiB/s
"link" (the proxy sends all bodies at that aggregate rate, so the bytes in flight at a kill
are what a real link holds, not what loopback buffers while the client's CPU falls behind),
and records:

  sent      body bytes the server sent in total (all runs of the phase), and sent / blob size
  refetched sent - blob size: the bytes the fault cost (with the fill endgame's hedged
            requests, counted in `hedges`)
  recover   seconds lost to the fault: phase time - baseline time, or for `down` the time from
            the registry's return to the fill's next durable byte
  verified  the committed blob's sha256 equals its digest

Output: a markdown table on stdout and bench/chaos-results.json (the numbers docs/reliability.md
quotes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcmu_obd.cache import PresenceMap  # noqa: E402
from tests.reliability.helpers import durable_bytes, zfile_blob  # noqa: E402
from tests.support.fetchcli import fetch_cmd, write_configs  # noqa: E402
from tests.support.faultproxy import Fault, FaultProxy  # noqa: E402
from tests.support.registry import RegistryProcess, push_blob  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BUSY = {"Retry-After": "1"}
PHASES = ["baseline", "busy", "reset", "truncate", "corrupt", "corrupt-plain", "stall", "down", "kill", "chaos"]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


class Phase:
    def __init__(self, bench: "Bench", name: str, plain: bool = False):
        self.bench, self.name = bench, name
        self.blob, self.digest = (bench.plain, bench.plain_digest) if plain else (bench.blob, bench.digest)
        self.size = len(self.blob)
        self.work = Path(tempfile.mkdtemp(prefix=f"chaos-{name}-", dir=bench.tmp))
        self.proxy = FaultProxy(bench.registry.url).start()
        self.proxy.rate = bench.a.link_mibps * MiB
        repo = "chaos/plain" if plain else "chaos/zfile"
        self.gconf, self.conf = write_configs(self.work, f"{self.proxy.url}/v2/{repo}/blobs",
                                              [(self.digest, self.size)])
        self.map = self.work / "layer0" / ".download.map"
        self.commit = self.work / "layer0" / "overlaybd.commit"
        self.notes: list[str] = []
        self.hedges = 0
        self.stats: dict = {}

    def start(self, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(fetch_cmd(self.gconf, self.conf, "--progress", "none", *extra), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *extra: str, timeout: float = 900) -> float:
        """One complete fetch; its --stats-json lands in self.stats (hedges summed)."""
        stats = self.work / "stats.json"
        t0 = time.monotonic()
        p = self.start("--stats-json", str(stats), *extra)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{self.name}: fetch failed ({p.returncode}): {out[-2000:]} {err[-2000:]}")
        self.stats = json.loads(stats.read_text())
        self.hedges += self.stats.get("hedges", 0)
        return time.monotonic() - t0

    def durable(self) -> int:
        return durable_bytes(self.map, self.size) if not self.commit.exists() else self.size

    def wait_durable(self, n: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.durable() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {n} bytes not durable after {timeout} s")
            time.sleep(0.05)

    def result(self, seconds: float, recover: float | None, **extra) -> dict:
        sent = self.proxy.sent_bytes()
        verified = (self.commit.exists()
                    and "sha256:" + hashlib.sha256(self.commit.read_bytes()).hexdigest() == self.digest)
        self.proxy.stop()
        shutil.rmtree(self.work, ignore_errors=True)
        return {"phase": self.name, "blob_bytes": self.size, "seconds": round(seconds, 2),
                "sent_bytes": sent, "sent_ratio": round(sent / self.size, 4), "refetched_bytes": sent - self.size,
                "recover_seconds": None if recover is None else round(recover, 2), "verified": verified,
                "endgame_hedges": self.hedges, "notes": self.notes, **extra}


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.tmp = Path(tempfile.mkdtemp(prefix="tcmu-obd-chaos-"))
        raw_mib = 20 if a.quick else 84  # ZFile of ~3/4: 16 MiB / 64 MiB
        self.blob = zfile_blob(raw_mib, seed=1)
        self.plain = os.urandom(len(self.blob))
        self.registry = RegistryProcess(self.tmp / "registry").__enter__()
        self.digest = push_blob(self.registry.url, "chaos/zfile", self.blob)
        self.plain_digest = push_blob(self.registry.url, "chaos/plain", self.plain)
        self.baseline: float | None = None

    def close(self) -> None:
        self.registry.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def lost(self, seconds: float) -> float | None:
        return None if self.baseline is None else max(0.0, seconds - self.baseline)

    # -- phases ---------------------------------------------------------------------------------
    def p_baseline(self) -> dict:
        ph = Phase(self, "baseline")
        t = ph.run()
        self.baseline = t
        return ph.result(t, 0.0, injected="none")

    def p_busy(self) -> dict:
        ph = Phase(self, "busy")
        f1 = ph.proxy.add(Fault(status=503, headers=BUSY, times=20))
        f2 = ph.proxy.add(Fault(status=429, headers=BUSY, times=10))
        t = ph.run()
        return ph.result(t, self.lost(t), injected=f"503 x{f1.hits} then 429 x{f2.hits}, Retry-After: 1")

    def p_reset(self) -> dict:
        ph = Phase(self, "reset")
        f = ph.proxy.add(Fault(kind="reset", after_bytes=256 << 10, times=10))
        t = ph.run()
        return ph.result(t, self.lost(t), injected=f"RST after 256 KiB of the body, x{f.hits}")

    def p_truncate(self) -> dict:
        ph = Phase(self, "truncate")
        f = ph.proxy.add(Fault(kind="truncate", after_bytes=300_000, times=10))
        t = ph.run()
        return ph.result(t, self.lost(t), injected=f"FIN after 300000 bytes of a longer Content-Length, x{f.hits}")

    def _corrupt(self, name: str, plain: bool) -> dict:
        ph = Phase(self, name, plain=plain)
        f = ph.proxy.add(Fault(kind="corrupt", at=ph.size * 2 // 3 + 4321))
        t = ph.run()
        s = ph.stats
        return ph.result(t, self.lost(t), injected=f"one byte flipped at {ph.size * 2 // 3 + 4321}, x{f.hits}",
                         mismatches=s["mismatches"], repaired_bytes=s["repaired_bytes"])

    def p_corrupt(self) -> dict:
        return self._corrupt("corrupt", plain=False)

    def p_corrupt_plain(self) -> dict:
        return self._corrupt("corrupt-plain", plain=True)

    def p_stall(self) -> dict:
        ph = Phase(self, "stall")
        stall = 5.0 if self.a.quick else 40.0  # the client's default read timeout is 30 s
        f = ph.proxy.add(Fault(kind="stall", after_bytes=64 << 10, delay=stall, skip=3, times=2))
        args = ("--read-timeout", "2") if self.a.quick else ()
        t = ph.run(*args)
        return ph.result(t, self.lost(t), injected=f"64 KiB then silence for {stall:.0f} s, x{f.hits} (concurrent)")

    def p_down(self) -> dict:
        ph = Phase(self, "down")
        away = 3.0 if self.a.quick else 60.0
        t0 = time.monotonic()
        stats = ph.work / "stats.json"
        p = ph.start("--stats-json", str(stats))
        ph.wait_durable(ph.size // 4)
        ph.proxy.go_down()
        went = time.monotonic()
        time.sleep(away)  # the outage itself is the thing measured; nothing to wait on
        before = ph.durable()
        ph.proxy.come_back()
        back = time.monotonic()
        while ph.durable() <= before and p.poll() is None:
            time.sleep(0.02)
        resumed = time.monotonic() - back
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"down: fetch failed: {err[-2000:]}")
        ph.hedges += json.loads(stats.read_text()).get("hedges", 0)
        ph.notes.append(f"away {back - went:.1f} s, {before} bytes durable when it came back")
        return ph.result(time.monotonic() - t0, resumed, injected=f"every connection dropped for {away:.0f} s")

    def _kill(self, ph: Phase, at_fraction: float) -> int:
        p = ph.start()
        ph.wait_durable(int(ph.size * at_fraction))
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        durable, sent = ph.durable(), ph.proxy.sent_bytes()
        ph.notes.append(f"kill -9: {sent} bytes sent, {durable} durable ({sent - durable} lost with the process)")
        return durable

    def p_kill(self) -> dict:
        ph = Phase(self, "kill")
        t0 = time.monotonic()
        at_kill = self._kill(ph, 0.4)
        t = ph.run()
        s = ph.stats
        ph.notes.append(f"the rerun took {t:.1f} s and fetched {s['fetched_bytes']} bytes "
                        f"({ph.size - at_kill} were missing; {s['hedges']} endgame hedges)")
        return ph.result(time.monotonic() - t0, None, injected="kill -9 at 40 % durable, then a rerun",
                         durable_at_kill=at_kill)

    def p_chaos(self) -> dict:
        ph = Phase(self, "chaos")
        stall = 5.0 if self.a.quick else 40.0
        px = ph.proxy
        px.add(Fault(status=503, headers=BUSY, times=5))
        px.add(Fault(kind="reset", after_bytes=200_000, skip=2, times=2))
        px.add(Fault(kind="stall", after_bytes=64 << 10, delay=stall, skip=4, times=1))
        t0 = time.monotonic()
        at_kill = self._kill(ph, 0.4)
        px.clear()
        px.add(Fault(status=503, headers=BUSY, times=5))
        px.add(Fault(kind="reset", after_bytes=100_000, skip=1, times=2))
        px.add(Fault(kind="truncate", after_bytes=300_000, skip=3, times=1))
        px.add(Fault(kind="stall", after_bytes=64 << 10, delay=stall, skip=5, times=1))
        # the flipped byte goes where the killed run left a hole, so the rerun fetches it
        missing = PresenceMap.load(str(ph.map), ph.size).missing_runs(0, ph.size)
        a, b = max(missing, key=lambda r: r[1] - r[0])
        flip = px.add(Fault(kind="corrupt", at=(a + b) // 2 + 999))
        args = ("--read-timeout", "2") if self.a.quick else ()
        ph.run(*args)
        s = ph.stats
        ph.notes.append(f"flipped byte hit x{flip.hits}; fill endgame hedges in the rerun: {s['hedges']}")
        return ph.result(time.monotonic() - t0, None,
                         injected=f"503s, resets, a short body, {stall:.0f} s stalls, one flipped byte, "
                                  "kill -9 + rerun",
                         durable_at_kill=at_kill, mismatches=s["mismatches"], repaired_bytes=s["repaired_bytes"])


def markdown(rows: list[dict]) -> str:
    out = ["| phase | injected | blob | sent (× blob) | refetched | hedges | recover | verified |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = "—" if r["recover_seconds"] is None else f"{r['recover_seconds']:.1f} s"
        out.append(f"| {r['phase']} | {r['injected']} | {r['blob_bytes'] / MiB:.1f} MiB | "
                   f"{r['sent_bytes'] / MiB:.1f} MiB ({r['sent_ratio']:.3f}×) | "
                   f"{r['refetched_bytes'] / MiB:.2f} MiB | {r['endgame_hedges']} | "
                   f"{rec} | {'yes' if r['verified'] else 'NO'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small blob, short outage and stalls")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    ap.add_argument("--link-mibps", type=float, default=25.0,
                    help="the proxy paces all bodies like one link of this many MiB/s (default 25)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "chaos-results.json"))
    a = ap.parse_args(argv)
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        ap.error(f"unknown phase(s) {bad}: choose from {PHASES}")
    if "baseline" not in phases:
        phases.insert(0, "baseline")  # every "recover" figure is relative to it
    b = Bench(a)
    rows = []
    try:
        for name in phases:
            log(f"chaos: phase {name} ...")
            r = getattr(b, "p_" + name.replace("-", "_"))()
            log(f"chaos: {name}: {r['seconds']} s, sent {r['sent_ratio']}x, verified {r['verified']}")
            rows.append(r)
    finally:
        b.close()
    table = markdown(rows)
    print(table)
    doc = {"quick": a.quick, "link_mibps": a.link_mibps, "machine": f"{os.cpu_count()} CPUs",
           "when": time.strftime("%Y-%m-%d"),
           "phases": rows}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
